"""Which adapter answers for whom: `production` aliases from MLflow, adapters on local disk.

The catalog re-reads every person's `production` alias every `refresh_seconds` (or on
demand) and downloads new versions into `DOPPEL_HOME/serve-cache/<name>/<version>`
before any request needs them. Every (name, version) gets its own LoRA id, never reused,
so a retrained adapter can never be mistaken for the one it replaced. When MLflow is
down, the last known aliases (also kept on disk) and the cached adapters keep serving.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from doppel.config import Settings
from doppel.consent import ConsentCache
from doppel.errors import DoppelError
from doppel.persona import PERSONA_FILE, PersonaCard
from doppel.redact import redact
from doppel.registry import PRODUCTION, Registry, model_name, owner

log = logging.getLogger(__name__)


class UnknownModel(DoppelError):
    """The request named a person or version we do not have (HTTP 404)."""


class RegistryUnavailable(DoppelError):
    """MLflow is down and the adapter asked for is not cached (HTTP 503)."""


class ConsentUnavailable(RegistryUnavailable):
    """The database that records consent does not answer: nobody is served (HTTP 503)."""


@dataclass(frozen=True)
class Adapter:
    """One downloaded adapter version, ready for an engine to load."""

    model_id: str  # what clients ask for: "<workspace_id>/<user_id>"
    name: str  # the registered model, doppel.<workspace_id>.<user_id>
    version: str
    lora_id: int  # unique per (name, version) for the life of the process
    path: Path
    card: PersonaCard
    rank: int

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


SLACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Slack's ids are T0123ABC, U0123ABC, ...
VERSION = re.compile(r"0*([1-9][0-9]{0,8})")  # a positive integer, leading zeros ignored


def parse_model(model: str) -> tuple[str, str, str | None]:
    """`T/U` or `T/U@3` to (workspace_id, user_id, version or None).

    Each part becomes a folder name in the cache and an MLflow name, so only Slack-style
    ids and positive integer versions pass, the version normalised (`@01` is `@1`).
    """
    person, at, version = model.partition("@")
    workspace_id, _, user_id = person.partition("/")
    number = VERSION.fullmatch(version)
    if not (SLACK_ID.fullmatch(workspace_id) and SLACK_ID.fullmatch(user_id)) or (
        at and number is None
    ):
        raise UnknownModel(
            f"model '{model}' is not '<workspace_id>/<user_id>' or "
            "'<workspace_id>/<user_id>@<version>' (a version is a positive integer)",
            "list the served models with GET /v1/models",
        )
    return workspace_id, user_id, number.group(1) if number else None


class AdapterCatalog:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache_dir = settings.home.resolve() / "serve-cache"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._aliases_file = self.cache_dir / "production.json"
        self._production: dict[str, tuple[str, str]] = {}  # model_id -> (name, version)
        self._adapters: dict[tuple[str, str], Adapter] = {}
        self._lora_ids = itertools.count(1)
        self._lock = threading.Lock()
        self.problems: dict[str, str] = {}  # model_id -> why it is not served
        self.mlflow_reachable = False
        self.last_error: str | None = None
        self.last_refresh: float | None = None
        self._consent = ConsentCache(settings.db_url, settings.serve.consent_cache_seconds)

    # -- what is served ------------------------------------------------------------

    def served(self) -> list[Adapter]:
        """The production adapter of every person who consents (as last read: no I/O, async
        code calls this), sorted by model id."""
        consenting = self._consent.known()
        with self._lock:
            keys = sorted(self._production.items())
        return [
            self._adapters[key]
            for model_id, key in keys
            if key in self._adapters and tuple(model_id.split("/", 1)) in consenting
        ]

    def resolve(self, model: str) -> Adapter:
        """The adapter for a request's `model`, downloading an explicit version if needed."""
        workspace_id, user_id, version = parse_model(model)
        model_id = f"{workspace_id}/{user_id}"
        self._require_consent(workspace_id, user_id)
        if version is None:
            with self._lock:
                key = self._production.get(model_id)
            if key is None:
                raise self._not_served(model_id)
            return self._adapters[key]
        name = model_name(workspace_id, user_id)
        with self._lock:
            cached = self._adapters.get((name, version))
        return cached or self._load(model_id, name, version)

    def _require_consent(self, workspace_id: str, user_id: str) -> None:
        """Checked on every request against the database (cached `consent_cache_seconds`),
        so a revoke stops a persona at once, cached adapters included. Someone without
        consent gets the 404 of someone we never had: it does not tell who exists."""
        try:
            allowed = self._consent.allows(workspace_id, user_id)
        except (SQLAlchemyError, DoppelError) as error:  # fail closed, whatever the cause
            log.warning("cannot read consent, serving nobody: %s", type(error).__name__)
            raise ConsentUnavailable(
                "consent cannot be checked: the database does not answer", "retry shortly"
            ) from None
        if not allowed:
            raise self._not_served(f"{workspace_id}/{user_id}")

    def _not_served(self, model_id: str) -> UnknownModel:
        return UnknownModel(f"no production adapter for '{model_id}'", self._known_hint())

    def _known_hint(self) -> str:
        known = [adapter.model_id for adapter in self.served()]
        return f"served models: {', '.join(known) or 'none yet (train and promote one)'}"

    # -- refreshing from MLflow ------------------------------------------------------

    def refresh(self) -> None:
        """Re-read every `production` alias and fetch new versions; never raises."""
        try:
            self._consent.reread()  # for `served`, which must not read the database itself
        except (SQLAlchemyError, DoppelError) as error:
            log.warning("cannot read consent: %s", type(error).__name__)
        try:
            registered, production = self._read_aliases()
        except Exception as error:  # MLflow down or broken: keep serving what we have
            self.mlflow_reachable = False
            self.last_error = redact(str(error).splitlines()[0][:300])
            log.warning("MLflow unreachable, serving cached adapters: %s", self.last_error)
            if not self._production:
                self._restore_aliases()
            return
        self.mlflow_reachable, self.last_error = True, None
        resolved: dict[str, tuple[str, str]] = {}
        for model_id, key in production.items():
            try:
                self._load(model_id, *key)
            except Exception as error:
                self.problems[model_id] = redact(str(error))
                log.warning("not serving %s: %s", model_id, self.problems[model_id])
                continue
            self.problems.pop(model_id, None)
            resolved[model_id] = key
        with self._lock:
            self._production = resolved
        self.last_refresh = time.time()
        self._save_aliases(resolved)
        self._forget_deleted(registered)

    def _read_aliases(self) -> tuple[set[str], dict[str, tuple[str, str]]]:
        """Every registered DoppelBot model, and the production version of each that has one."""
        registry = Registry(self.settings)
        names, production = set(), {}
        for registered in registry.client.search_registered_models("name LIKE 'doppel.%'"):
            names.add(registered.name)
            workspace_id, user_id = owner(registered.tags)
            current = _production_version(registry, registered.name)
            if workspace_id and user_id and current is not None:
                production[f"{workspace_id}/{user_id}"] = (registered.name, current)
        return names, production

    def _forget_deleted(self, registered: set[str]) -> None:
        """A model deleted from the registry (someone opted out) leaves no copy behind."""
        with self._lock:
            for key in [key for key in self._adapters if key[0] not in registered]:
                del self._adapters[key]
        for folder in self.cache_dir.iterdir():
            if (
                folder.is_dir()
                and folder.name.startswith("doppel.")
                and folder.name not in registered
            ):
                shutil.rmtree(folder, ignore_errors=True)

    def _save_aliases(self, production: dict[str, tuple[str, str]]) -> None:
        staging = self._aliases_file.with_suffix(".tmp")
        staging.write_text(json.dumps({k: list(v) for k, v in production.items()}))
        staging.replace(self._aliases_file)

    def _restore_aliases(self) -> None:
        """At a start with MLflow down: the aliases last seen, for the adapters on disk."""
        if not self._aliases_file.is_file():
            return
        saved: dict[str, list[str]] = json.loads(self._aliases_file.read_text())
        restored = {}
        for model_id, (name, version) in saved.items():
            try:
                self._load(model_id, name, version)
            except DoppelError:
                continue
            restored[model_id] = (name, version)
        with self._lock:
            self._production = restored

    # -- local cache -------------------------------------------------------------------

    def _load(self, model_id: str, name: str, version: str) -> Adapter:
        """The adapter from the local cache, downloading it from MLflow on first use."""
        with self._lock:
            if (name, version) in self._adapters:
                return self._adapters[(name, version)]
        folder = self._cache_path(name, version)
        if not (folder / PERSONA_FILE).is_file():
            self._download(name, version, folder)
        card = PersonaCard.read(folder)
        if card.base_model != self.settings.serve.base_model:
            raise DoppelError(
                f"{name} version {version} was trained on {card.base_model}, "
                f"but this server serves {self.settings.serve.base_model}",
                "serve that base (serve.base_model) or retrain on this one",
            )
        with self._lock:
            adapter = self._adapters.get((name, version))
            if adapter is None:
                adapter = Adapter(
                    model_id, name, version, next(self._lora_ids), folder, card, _rank(folder)
                )
                self._adapters[(name, version)] = adapter
        return adapter

    def _cache_path(self, name: str, version: str) -> Path:
        """`serve-cache/<name>/<version>`, checked to stay in the cache whatever the names
        hold (the aliases file on disk is read back too)."""
        try:
            folder = (self.cache_dir / name / version).resolve()
            inside = folder.is_relative_to(self.cache_dir)
        except (OSError, ValueError):  # a NUL byte, a symlink loop
            inside = False
        if not inside or len(folder.relative_to(self.cache_dir).parts) != 2:
            raise UnknownModel(
                f"{name} version {version} does not name a folder inside the adapter cache",
                "names are doppel.<workspace_id>.<user_id>, versions positive integers",
            )
        return folder

    def _download(self, name: str, version: str, folder: Path) -> None:
        """Fetch into a staging folder, then rename: a half download is never used."""
        try:
            registry = Registry(self.settings)
        except DoppelError as error:
            raise RegistryUnavailable(
                f"{name} version {version} is not cached and MLflow is unreachable",
                "retry when MLflow is back",
            ) from error
        try:
            registry.version(name, version)
        except DoppelError as error:  # an unknown version is a 404, not a 500
            raise UnknownModel(error.message, error.hint) from None
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=folder.parent))
        try:
            adapter_dir = registry.download_adapter(name, version, staging)
            PersonaCard.read(adapter_dir)
            shutil.rmtree(folder, ignore_errors=True)
            adapter_dir.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return {
            "mlflow_reachable": self.mlflow_reachable,
            "last_error": self.last_error,
            "last_refresh": self.last_refresh,
            "served": len(self.served()),
            "not_served": dict(self.problems),
        }


def _production_version(registry: Registry, name: str) -> str | None:
    """The `production` version, None when there is none. Unlike `Registry.production`,
    any other failure (MLflow going away mid-refresh) raises, so it is never mistaken
    for "nobody is in production" and the cached versions keep serving."""
    try:
        return str(registry.client.get_model_version_by_alias(name, PRODUCTION).version)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _rank(adapter_dir: Path) -> int:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
