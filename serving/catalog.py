"""Which adapter answers for whom: `production` aliases from MLflow, adapters on local disk.

The catalog re-reads every person's `production` alias every `refresh_seconds` (or on
demand) in one paged listing of the registered models, which carries their aliases: a
refresh costs one MLflow call per 100 people, and downloads nothing. An adapter is
downloaded into the disk cache (`serving.adapter_cache`) on its first request, which
waits for it (concurrent requests for it share one download), or ahead of time by
`prefetch`, which the server runs in the background. Every (name, version) gets its own
LoRA id, never reused, so a retrained adapter can never be mistaken for the one it
replaced. When MLflow is down, the last known aliases (also kept on disk) and the cached
adapters keep serving.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from doppel.config import Settings
from doppel.consent import ConsentCache
from doppel.errors import DoppelError
from doppel.persona import PersonaCard
from doppel.redact import redact
from doppel.registry import PRODUCTION, Registry, model_name, owner
from serving.adapter_cache import AdapterCache, Key

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


@dataclass(frozen=True)
class ServedModel:
    """A person served: their production version, downloaded yet or not."""

    model_id: str  # "<workspace_id>/<user_id>"
    name: str
    version: str

    @property
    def workspace_id(self) -> str:
        return self.model_id.split("/", 1)[0]


SLACK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Slack's ids are T0123ABC, U0123ABC, ...
VERSION = re.compile(r"0*([1-9][0-9]{0,8})")  # a positive integer, leading zeros ignored
HINT_MODELS = 20  # models named in a 404's hint; /v1/models lists them all
EVICTION_RETRIES = 3  # an adapter evicted between its download and its use is fetched again


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
        serve = settings.serve
        self.cache = AdapterCache(
            settings.home.resolve() / "serve-cache", int(serve.max_cache_gb * 1e9)
        )
        self.cache_dir = self.cache.root
        self._aliases_file = self.cache_dir / "production.json"
        self._production: dict[str, Key] = {}  # model_id -> (name, version)
        self._adapters: dict[Key, Adapter] = {}  # read from disk: persona card, rank
        self._lora_ids: dict[Key, int] = {}
        self._next_lora_id = itertools.count(1)
        self._pending: dict[Key, Future[Adapter]] = {}  # downloads under way
        self._unservable: dict[str, tuple[Key, str]] = {}  # model_id -> (version, why not)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.mlflow_reachable = False
        self.last_error: str | None = None
        self.last_refresh: float | None = None
        self._consent = ConsentCache(settings.db_url, serve.consent_cache_seconds)

    # -- what is served ------------------------------------------------------------

    def served(self) -> list[ServedModel]:
        """Every person who consents and has a production adapter (as last read: no I/O,
        async code calls this), sorted by model id."""
        consenting = self._consent.known()
        with self._lock:
            production = sorted(self._production.items())
            broken = {model_id: key for model_id, (key, _) in self._unservable.items()}
        return [
            ServedModel(model_id, *key)
            for model_id, key in production
            if broken.get(model_id) != key and tuple(model_id.split("/", 1)) in consenting
        ]

    def production_version(self, model_id: str) -> str | None:
        """The version `served` lists for `model_id`, if it lists it; no I/O."""
        key = self._servable(model_id)
        if key is None or tuple(model_id.split("/", 1)) not in self._consent.known():
            return None
        return key[1]

    def _servable(self, model_id: str) -> Key | None:
        """The production version of `model_id`, unless it proved unservable here."""
        with self._lock:
            key = self._production.get(model_id)
            problem = self._unservable.get(model_id)
        return None if problem is not None and problem[0] == key else key

    def resolve(self, model: str) -> Adapter:
        """The adapter for a request's `model`, downloaded on first use."""
        return self._resolve(model, pin=False)

    def acquire(self, model: str) -> Adapter:
        """`resolve`, and keep the adapter on disk until `release`: an engine may read it
        at any time until the request ends."""
        return self._resolve(model, pin=True)

    def release(self, adapter: Adapter) -> None:
        self.cache.unpin((adapter.name, adapter.version))

    def _resolve(self, model: str, pin: bool) -> Adapter:
        workspace_id, user_id, version = parse_model(model)
        model_id = f"{workspace_id}/{user_id}"
        self._require_consent(workspace_id, user_id)
        if version is not None:
            return self._load(model_id, model_name(workspace_id, user_id), version, pin=pin)
        key = self._servable(model_id)
        if key is None:
            raise self._not_served(model_id)
        return self._production_adapter(model_id, key, pin)

    def _production_adapter(self, model_id: str, key: Key, pin: bool) -> Adapter:
        """A production adapter; one that cannot be served here (another base model, no
        persona card) is taken off the list, with the reason in `status`."""
        try:
            return self._load(model_id, *key, pin=pin)
        except (UnknownModel, RegistryUnavailable):
            raise
        except DoppelError as error:
            reason = redact(str(error))
            with self._lock:
                self._unservable[model_id] = (key, reason)
            log.warning("not serving %s: %s", model_id, reason)
            raise self._not_served(model_id) from None

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
        known = [model.model_id for model in self.served()]
        if not known:
            return "served models: none yet (train and promote one)"
        more = len(known) - HINT_MODELS
        rest = f" and {more} more (GET /v1/models)" if more > 0 else ""
        return f"served models: {', '.join(known[:HINT_MODELS])}{rest}"

    # -- refreshing from MLflow ------------------------------------------------------

    def refresh(self) -> None:
        """Re-read every `production` alias; never raises, downloads nothing."""
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
        with self._lock:
            self._production = production
            self._unservable = {
                model_id: problem
                for model_id, problem in self._unservable.items()
                if production.get(model_id) == problem[0]
            }
        self.last_refresh = time.time()
        self._save_aliases(production)
        self._forget_deleted(registered)  # the listing was complete: absent means deleted
        self._prune_superseded()

    def _read_aliases(self) -> tuple[set[str], dict[str, Key]]:
        """Every registered DoppelBot model, and the production version of each that has
        one, from the aliases the listing carries: one call per page of models."""
        names, production = set(), {}
        for registered in Registry(self.settings).registered_models():
            names.add(registered.name)
            workspace_id, user_id = owner(registered.tags)
            version = registered.aliases.get(PRODUCTION)
            if workspace_id and user_id and version is not None:
                production[f"{workspace_id}/{user_id}"] = (registered.name, str(version))
        return names, production

    def _forget_deleted(self, registered: set[str]) -> None:
        """A model deleted from the registry (someone opted out) leaves no copy behind."""
        self.cache.forget_models(registered)
        with self._lock:
            for key in [key for key in self._adapters if key[0] not in registered]:
                del self._adapters[key]

    def _prune_superseded(self) -> None:
        """Versions no longer in production go once nobody has asked for them for
        `serve.keep_superseded_minutes` (an operator comparing a challenger, say)."""
        with self._lock:
            current = set(self._production.values())
        since = time.time() - self.settings.serve.keep_superseded_minutes * 60
        old = [key for key in self.cache.last_uses() if key not in current]
        self._dropped(self.cache.remove_unused(old, older_than=since))

    def _dropped(self, keys: list[Key]) -> None:
        with self._lock:
            for key in keys:
                self._adapters.pop(key, None)

    def _save_aliases(self, production: dict[str, Key]) -> None:
        staging = self._aliases_file.with_suffix(".tmp")
        staging.write_text(json.dumps({k: list(v) for k, v in production.items()}))
        staging.replace(self._aliases_file)

    def _restore_aliases(self) -> None:
        """At a start with MLflow down: the aliases last seen, for the adapters on disk."""
        if not self._aliases_file.is_file():
            return
        saved: dict[str, list[str]] = json.loads(self._aliases_file.read_text())
        restored = {
            model_id: (name, version)
            for model_id, (name, version) in saved.items()
            if self.cache.has((name, version))
        }
        with self._lock:
            self._production = restored

    # -- ahead of time -----------------------------------------------------------------

    def prefetch(self, limit: int) -> int:
        """Download up to `limit` production adapters that are not on disk yet, one at a
        time, into free space only (it never evicts to make room): first the new versions
        of people served before, most recently used first, then the others. Stops early
        on `close`. Returns how many it fetched."""
        fetched = 0
        for model_id, key in self._prefetch_order():
            if fetched >= limit or self._closing.is_set() or not self.cache.room_for_another():
                break
            try:
                self._production_adapter(model_id, key, pin=False)
            except Exception as error:  # in the background: logged, and the next one goes on
                log.warning("prefetching %s: %s", model_id, redact(str(error)))
                continue
            fetched += 1
        return fetched

    def _prefetch_order(self) -> list[tuple[str, Key]]:
        missing = {
            model.model_id: (model.name, model.version)
            for model in self.served()
            if not self.cache.has((model.name, model.version))
        }
        recent: dict[str, float] = {}  # each model's most recent use of any version
        for (name, _), used in self.cache.last_uses().items():
            recent[name] = max(recent.get(name, 0.0), used)
        return sorted(missing.items(), key=lambda item: -recent.get(item[1][0], 0.0))

    def close(self) -> None:
        """Stop prefetching after the download under way."""
        self._closing.set()

    # -- local cache -------------------------------------------------------------------

    def _load(self, model_id: str, name: str, version: str, pin: bool = False) -> Adapter:
        """The adapter from the local cache, downloading it from MLflow on first use;
        `pin` holds it on disk until `release`."""
        key = (name, version)
        if self.cache.folder(name, version) is None:
            raise UnknownModel(
                f"{name} version {version} does not name a folder inside the adapter cache",
                "names are doppel.<workspace_id>.<user_id>, versions positive integers",
            )
        for _ in range(EVICTION_RETRIES):
            adapter = self._ensure(model_id, key)
            if self.cache.pin(key) if pin else self.cache.touch(key):
                return adapter
        raise RegistryUnavailable(
            f"{name} version {version} was evicted from the adapter cache as soon as fetched",
            "raise serve.max_cache_gb: the adapters in use fill it",
        )

    def _ensure(self, model_id: str, key: Key) -> Adapter:
        """The adapter on disk and read; one download however many requests want it."""
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is not None and self.cache.has(key):
                return adapter
            pending = self._pending.get(key)
            first = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not first:
            return pending.result()
        try:
            adapter = self._fetch(model_id, key)
        except BaseException as error:
            pending.set_exception(error)
            raise
        finally:
            with self._lock:
                del self._pending[key]
        pending.set_result(adapter)
        return adapter

    def _fetch(self, model_id: str, key: Key) -> Adapter:
        name, version = key
        if not self.cache.pin(key):  # held while it is read: not evicted under our feet
            self.cache.add(key, partial(self._download, name, version))
            self._dropped(self.cache.make_room())
        try:
            folder = self.cache.folder(name, version)
            assert folder is not None  # checked by `_load`
            card = PersonaCard.read(folder)
            if card.base_model != self.settings.serve.base_model:
                raise DoppelError(
                    f"{name} version {version} was trained on {card.base_model}, "
                    f"but this server serves {self.settings.serve.base_model}",
                    "serve that base (serve.base_model) or retrain on this one",
                )
            adapter = Adapter(
                model_id, name, version, self._lora_id(key), folder, card, _rank(folder)
            )
        finally:
            self.cache.unpin(key)
        with self._lock:
            self._adapters[key] = adapter
            if self._unservable.get(model_id, (None,))[0] == key:
                del self._unservable[model_id]
        return adapter

    def _lora_id(self, key: Key) -> int:
        """The same id for a version fetched again after an eviction: it is the same adapter."""
        with self._lock:
            if key not in self._lora_ids:
                self._lora_ids[key] = next(self._next_lora_id)
            return self._lora_ids[key]

    def _download(self, name: str, version: str, staging: Path) -> Path:
        """The adapter folder, fetched into `staging` (the cache renames it into place)."""
        try:
            registry = Registry(self.settings)
        except DoppelError as error:
            raise RegistryUnavailable(
                f"{name} version {version} is not cached and MLflow is unreachable",
                "retry when MLflow is back",
            ) from error
        try:
            adapter_dir = registry.download_adapter(name, version, staging)
        except DoppelError as error:  # an unknown version is a 404, not a 500
            raise UnknownModel(error.message, error.hint) from None
        except (MlflowException, OSError) as error:
            why = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            raise RegistryUnavailable(
                f"{name} version {version} could not be downloaded: {redact(why)}",
                "retry shortly",
            ) from None
        PersonaCard.read(adapter_dir)  # a folder without its card never enters the cache
        return adapter_dir

    def status(self) -> dict[str, Any]:
        with self._lock:
            unservable = {model_id: why for model_id, (_, why) in self._unservable.items()}
        return {
            "mlflow_reachable": self.mlflow_reachable,
            "last_error": self.last_error,
            "last_refresh": self.last_refresh,
            "served": len(self.served()),
            "not_served": unservable,
            "cache": self.cache.usage(),
        }


def _rank(adapter_dir: Path) -> int:
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise DoppelError(
            f"the adapter at {adapter_dir} has no readable adapter_config.json",
            "retrain it: doppel pipeline --user USER",
        ) from None
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
