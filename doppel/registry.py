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
from mlflow.entities.model_registry import ModelVersion
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
        """Every version, oldest first, with aliases (searches leave those out)."""
        try:
            found = self.client.search_model_versions(f"name = '{name}'")
        except (MlflowException, RestException):
            return []
        ordered = sorted(found, key=lambda v: int(v.version))
        return [self.client.get_model_version(name, str(v.version)) for v in ordered]

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
            versions = [
                mv
                for page in _pages(
                    lambda token: self.client.search_model_versions(
                        f"name = '{name}'", max_results=PAGE_SIZE, page_token=token
                    )
                )
                for mv in page
            ]
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
        experiments = _pages(
            lambda token: self.client.search_experiments(
                view_type=ViewType.ALL, max_results=PAGE_SIZE, page_token=token
            )
        )
        for page in experiments:
            ids = [experiment.experiment_id for experiment in page]
            for key in ("workspace_id", "team_id"):  # older runs say team_id
                query = f"tags.{key} = '{workspace_id}' AND tags.user_id = '{user_id}'"
                found |= {run.info.run_id: run for run in self._all_runs(ids, query)}
        return list(found.values())

    def _all_runs(self, experiment_ids: list[str], query: str) -> Iterator[Run]:
        """Every run the query matches, live or deleted, page after page."""
        for page in _pages(
            lambda token: self.client.search_runs(
                experiment_ids, query, ViewType.ALL, PAGE_SIZE, page_token=token
            )
        ):
            yield from page

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
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(into)))

    def run_metrics(self, run_id: str) -> dict[str, float]:
        return dict(self.client.get_run(run_id).data.metrics)

    def models(self, workspace_id: str | None = None) -> list[dict[str, Any]]:
        """Every DoppelBot model with its versions, aliases, metrics and decisions."""
        prefix = f"doppel.{workspace_id}." if workspace_id else "doppel."
        result = []
        for registered in self.client.search_registered_models(f"name LIKE '{prefix}%'"):
            production = self.production(registered.name)
            versions = []
            for mv in self.versions(registered.name):
                versions.append(
                    {
                        "version": int(mv.version),
                        "aliases": sorted(mv.aliases),
                        "run_id": mv.run_id,
                        "metrics": self.run_metrics(mv.run_id) if mv.run_id else {},
                        "decision": mv.tags.get("decision"),
                        "reason": mv.tags.get("reason"),
                    }
                )
            workspace_id, user_id = owner(registered.tags)
            result.append(
                {
                    "name": registered.name,
                    "workspace_id": workspace_id,
                    "user_id": user_id,
                    "production": int(production.version) if production else None,
                    "versions": versions,
                }
            )
        return sorted(result, key=lambda model: model["name"])


def _pages(search: Callable[[str | None], PagedList[T]]) -> Iterator[PagedList[T]]:
    """Every page of an MLflow search, following `page_token` to the end."""
    token = None
    while True:
        page = search(token)
        yield page
        token = page.token
        if not token:
            return


def _gone(error: Exception) -> bool:
    """Already deleted (by a revoke or a training stopping at the same time): not a failure."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
