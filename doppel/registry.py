"""MLflow: one experiment per workspace, one registered model per person.

Each training run becomes a version of `doppel.<workspace_id>.<user_id>`. A new version gets
the alias `challenger`; only the gate (or an operator) moves `production`. Every version
carries the gate's decision and its reason as tags, and the version it replaced, so
`rollback` knows where to go back to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import mlflow
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Run, ViewType
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException, RestException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.entities.paged_list import PagedList

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.redact import redact, redact_url

PRODUCTION = "production"
CHALLENGER = "challenger"
ADAPTER_ARTIFACT = "adapter"
PAGE_SIZE = 100  # results per MLflow search page
T = TypeVar("T")


def model_name(workspace_id: str, user_id: str) -> str:
    return f"doppel.{workspace_id}.{user_id}"


def owner(tags: dict[str, str]) -> tuple[str | None, str | None]:
    """(workspace_id, user_id) of a registered model or run; older registries say `team_id`."""
    return tags.get("workspace_id") or tags.get("team_id"), tags.get("user_id")


def tracking_uri(settings: Settings) -> str:
    """`MLFLOW_TRACKING_URI`, or a SQLite store under DOPPEL_HOME."""
    return settings.mlflow_tracking_uri or f"sqlite:///{settings.home.resolve() / 'mlflow.db'}"


@dataclass
class Registry:
    """The MLflow client, pointed at our tracking server and checked to answer."""

    settings: Settings

    def __post_init__(self) -> None:
        self.uri = tracking_uri(self.settings)
        self.settings.home.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self._check_reachable()

    def _check_reachable(self) -> None:
        """Fail in seconds, not after MLflow's minutes of retries, when it is down."""
        try:
            if self.uri.startswith(("http://", "https://")):
                httpx.get(self.uri.rstrip("/") + "/health", timeout=5).raise_for_status()
            else:
                self.client.search_experiments(max_results=1)
        except Exception as error:
            raise DoppelError(
                f"MLflow is unreachable at {redact_url(self.uri)}: "
                f"{redact(str(error).splitlines()[0][:200])}",
                "start it (mlflow server --workers 1) or fix MLFLOW_TRACKING_URI",
            ) from None

    # -- experiments ----------------------------------------------------------------

    def experiment_id(self, workspace_id: str) -> str:
        """One experiment per workspace. Without a tracking server (SQLite or PostgreSQL
        straight from this process) artifacts go under DOPPEL_HOME, not the working folder."""
        name = f"doppel/{workspace_id}"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if not self.uri.startswith(("http://", "https://")):
            location = (self.settings.home.resolve() / "mlartifacts" / workspace_id).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    # -- versions ---------------------------------------------------------------------

    def register(self, workspace_id: str, user_id: str, run_id: str, tags: dict[str, str]) -> str:
        """A new version from the run's adapter artifact, aliased `challenger`."""
        name = model_name(workspace_id, user_id)
        try:
            self.client.create_registered_model(
                name, tags={"workspace_id": workspace_id, "user_id": user_id}
            )
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name, source=f"runs:/{run_id}/{ADAPTER_ARTIFACT}", run_id=run_id, tags=tags
        )
        self.client.set_registered_model_alias(name, CHALLENGER, version.version)
        return str(version.version)

    def version(self, name: str, version: str) -> ModelVersion:
        try:
            return self.client.get_model_version(name, version)
        except MlflowException:
            known = [v.version for v in self.versions(name)]
            raise DoppelError(
                f"{name} has no version {version}",
                f"known versions: {', '.join(known) or 'none (train first)'}",
            ) from None

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version, oldest first, with aliases. Searches leave those out: they come
        from the registered model, in one call for all versions."""
        try:
            found = self._model_versions(f"name = '{name}'")
            aliases = self.client.get_registered_model(name).aliases if found else {}
        except (MlflowException, RestException):
            return []
        return _with_aliases(found, aliases)

    def production(self, name: str) -> ModelVersion | None:
        try:
            return self.client.get_model_version_by_alias(name, PRODUCTION)
        except MlflowException:
            return None

    def record_decision(self, name: str, version: str, decision: str, reason: str) -> None:
        self.client.set_model_version_tag(name, version, "decision", decision)
        self.client.set_model_version_tag(name, version, "reason", reason)

    def promote(self, name: str, version: str, reason: str) -> None:
        """Move `production` to `version`, remembering the version it replaces."""
        self.version(name, version)
        current = self.production(name)
        if current is not None and str(current.version) != str(version):
            self.client.set_model_version_tag(
                name, version, "previous_production", str(current.version)
            )
        self.client.set_registered_model_alias(name, PRODUCTION, version)
        self.record_decision(name, version, "promoted", reason)

    def rollback(self, name: str) -> tuple[str, str]:
        """Move `production` back to the version it replaced; returns (from, to)."""
        current = self.production(name)
        if current is None:
            raise DoppelError(f"{name} has no production version", "nothing to roll back")
        previous = current.tags.get("previous_production")
        if not previous:
            raise DoppelError(
                f"{name} version {current.version} replaced no earlier version",
                "promote a specific version instead: doppel promote --user U --version N",
            )
        self.client.set_registered_model_alias(name, PRODUCTION, previous)
        self.record_decision(name, current.version, "rolled_back", f"rolled back to {previous}")
        return str(current.version), previous

    def delete_person(self, workspace_id: str, user_id: str, failed: list[str]) -> dict[str, Any]:
        """Delete a person's registered model with every version, and every MLflow run made
        of them with its artifacts (the adapters, the dataset copy, the evaluation replies).

        Runs are found by their tags, not only through versions: a training that never
        registered, failed or was killed leaves a run too. What cannot be deleted is added
        to `failed` and the rest still goes; running it again finishes the job."""
        name = model_name(workspace_id, user_id)
        deleted: dict[str, Any] = {"name": name, "versions": [], "runs": []}
        try:
            versions = self._model_versions(f"name = '{name}'")
            tagged = [run.info.run_id for run in self.person_runs(workspace_id, user_id)]
        except (MlflowException, OSError) as error:
            failed.append(f"MLflow search for {name}: {_first_line(error)}")
            return deleted
        for mv in versions:
            try:
                self.client.delete_model_version(name, str(mv.version))
                deleted["versions"].append(str(mv.version))
            except (MlflowException, OSError) as error:
                if not _gone(error):
                    failed.append(f"{name} version {mv.version}: {_first_line(error)}")
        try:
            self.client.delete_registered_model(name)
        except (MlflowException, OSError) as error:
            if not _gone(error):
                failed.append(f"registered model {name}: {_first_line(error)}")
        for run_id in dict.fromkeys([*(v.run_id for v in versions if v.run_id), *tagged]):
            try:
                if self._delete_run(run_id):
                    deleted["runs"].append(run_id)
            except (MlflowException, OSError) as error:
                failed.append(f"MLflow run {run_id}: {_first_line(error)}")
        return deleted

    def person_runs(self, workspace_id: str, user_id: str) -> list[Run]:
        """Every run tagged with this person, in every experiment, whatever its state:
        finished, failed, killed, or deleted with its artifacts still stored."""
        found: dict[str, Run] = {}
        for ids in _chunks(self._experiment_ids(), PAGE_SIZE):
            for key in ("workspace_id", "team_id"):  # older runs say team_id
                query = f"tags.{key} = '{workspace_id}' AND tags.user_id = '{user_id}'"
                found |= {run.info.run_id: run for run in self._all_runs(ids, query)}
        return list(found.values())

    def _experiment_ids(self) -> list[str]:
        """Every experiment, live or deleted."""
        return [
            experiment.experiment_id
            for experiment in _all(
                lambda token: self.client.search_experiments(
                    view_type=ViewType.ALL, max_results=PAGE_SIZE, page_token=token
                )
            )
        ]

    def _all_runs(self, experiment_ids: list[str], query: str) -> list[Run]:
        """Every run the query matches, live or deleted, page after page."""
        return _all(
            lambda token: self.client.search_runs(
                experiment_ids, query, ViewType.ALL, PAGE_SIZE, page_token=token
            )
        )

    def _model_versions(self, query: str) -> list[ModelVersion]:
        """Every version the query matches, page after page (without aliases)."""
        return _all(
            lambda token: self.client.search_model_versions(
                query, max_results=PAGE_SIZE, page_token=token
            )
        )

    def registered_models(self, workspace_id: str | None = None) -> list[RegisteredModel]:
        """Every DoppelBot registered model (of one workspace), with its tags and aliases,
        in one call per PAGE_SIZE models."""
        prefix = _prefix(workspace_id)
        found = _all(
            lambda token: self.client.search_registered_models(
                f"name LIKE '{prefix}%'", max_results=PAGE_SIZE, page_token=token
            )
        )
        return [model for model in found if model.name.startswith(prefix)]  # `_` is a wildcard

    def _delete_run(self, run_id: str) -> bool:
        """Delete a run's artifacts, then the run; False when nothing of it was left."""
        try:
            info = self.client.get_run(run_id).info
        except MlflowException as error:
            if _gone(error):
                return False
            raise
        artifacts = get_artifact_repository(info.artifact_uri)
        leftovers = bool(artifacts.list_artifacts())
        if leftovers:
            artifacts.delete_artifacts()
        live = info.lifecycle_stage == LifecycleStage.ACTIVE
        if live:
            self.client.delete_run(run_id)
        return leftovers or live

    def download_adapter(self, name: str, version: str, into: Path) -> Path:
        """The version's adapter folder, fetched through MLflow (no shared disk needed)."""
        mv = self.version(name, version)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=mv.source, dst_path=str(into), tracking_uri=self.uri
            )
        )

    def run_metrics(self, run_ids: list[str]) -> dict[str, dict[str, float]]:
        """Each run's metrics, PAGE_SIZE runs a call rather than one call a run."""
        if not run_ids:
            return {}
        experiments = self._experiment_ids()
        metrics = {}
        for chunk in _chunks(list(dict.fromkeys(run_ids)), PAGE_SIZE):
            quoted = ", ".join(f"'{run_id}'" for run_id in chunk)
            query = f"attributes.run_id IN ({quoted})"
            for ids in _chunks(experiments, PAGE_SIZE):
                for run in self._all_runs(ids, query):
                    metrics[run.info.run_id] = dict(run.data.metrics)
        return metrics

    def models(self, workspace_id: str | None = None) -> list[dict[str, Any]]:
        """Every DoppelBot model with its versions, aliases, metrics and decisions.

        A few paged searches whatever the number of people: the registered models (with
        their aliases), every version of them, and the runs' metrics in batches."""
        registered = self.registered_models(workspace_id)
        by_name: dict[str, list[ModelVersion]] = {model.name: [] for model in registered}
        for mv in self._model_versions(f"name LIKE '{_prefix(workspace_id)}%'"):
            if mv.name in by_name:
                by_name[mv.name].append(mv)
        metrics = self.run_metrics(
            [mv.run_id for mvs in by_name.values() for mv in mvs if mv.run_id]
        )
        result = []
        for model in registered:
            workspace, user_id = owner(model.tags)
            production = model.aliases.get(PRODUCTION)
            versions = _with_aliases(by_name[model.name], model.aliases)
            result.append(
                {
                    "name": model.name,
                    "workspace_id": workspace,
                    "user_id": user_id,
                    "production": int(production) if production is not None else None,
                    "not_served": self._not_served(versions, production),
                    "versions": [
                        {
                            "version": int(mv.version),
                            "aliases": sorted(mv.aliases),
                            "run_id": mv.run_id,
                            "base_model": mv.tags.get("base_model"),
                            "metrics": metrics.get(mv.run_id, {}) if mv.run_id else {},
                            "decision": mv.tags.get("decision"),
                            "reason": mv.tags.get("reason"),
                        }
                        for mv in versions
                    ],
                }
            )
        return sorted(result, key=lambda model: model["name"])

    def _not_served(self, versions: list[ModelVersion], production: object) -> str | None:
        """Why serving cannot serve the production version: it was trained on another base
        than `serve.base_model` (serving says the same in /readyz's `not_served`)."""
        served = self.settings.serve.base_model
        for mv in versions:
            base = mv.tags.get("base_model")
            if str(mv.version) == str(production) and base is not None and base != served:
                return f"version {production} was trained on {base}, but serving serves {served}"
        return None


def _pages(search: Callable[[str | None], PagedList[T]]) -> Iterator[PagedList[T]]:
    """Every page of an MLflow search, following `page_token` to the end."""
    token = None
    while True:
        page = search(token)
        yield page
        token = page.token
        if not token:
            return


def _all(search: Callable[[str | None], PagedList[T]]) -> list[T]:
    """Every result of an MLflow search: a listing is complete, or it raises."""
    return [item for page in _pages(search) for item in page]


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prefix(workspace_id: str | None) -> str:
    return f"doppel.{workspace_id}." if workspace_id else "doppel."


def _with_aliases(versions: list[ModelVersion], aliases: dict[str, Any]) -> list[ModelVersion]:
    """The versions, oldest first, each with the aliases the registered model gives it
    (alias versions are ints from SQL stores, strings over REST)."""
    for mv in versions:
        mv.aliases = sorted(alias for alias, to in aliases.items() if str(to) == str(mv.version))
    return sorted(versions, key=lambda mv: int(mv.version))


def _gone(error: Exception) -> bool:
    """Already deleted (by a revoke or a training stopping at the same time): not a failure."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
