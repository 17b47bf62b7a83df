"""The adapters on local disk, `DOPPEL_HOME/serve-cache/<name>/<version>`, bounded in size.

A download lands in a staging folder and is renamed into place, so a half download is
never used; a removal renames the folder away before deleting it, so a new download of
the same version can land at once. Past `max_bytes` the least recently used adapters go
first, never one that a request holds (`pin`). The last use is kept as the folder's
modification time too, so the order survives a restart.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from doppel.persona import PERSONA_FILE

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (registered model name, version)
GONE = ".gone."  # the prefix of a folder renamed away, being deleted


@dataclass
class _Entry:
    size: int  # bytes on disk
    used: float  # last use, seconds since the epoch
    pins: int = 0  # requests holding it


class AdapterCache:
    """Which adapter versions are on disk, how big, when last used, and which are in use."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries: dict[Key, _Entry] = {}
        self._lock = threading.Lock()
        self._scan()

    def folder(self, name: str, version: str) -> Path | None:
        """`<root>/<name>/<version>`, or None when the names would lead anywhere else (the
        names come from requests, and from the aliases file on disk)."""
        try:
            folder = (self.root / name / version).resolve()
            inside = folder.is_relative_to(self.root)
        except (OSError, ValueError):  # a NUL byte, a symlink loop
            return None
        if not inside or len(folder.relative_to(self.root).parts) != 2:
            return None
        if not name.startswith("doppel.") or version.startswith("."):
            return None
        return folder

    # -- what is here ----------------------------------------------------------------------

    def has(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def last_uses(self) -> dict[Key, float]:
        """Every cached adapter and when it was last used."""
        with self._lock:
            return {key: entry.used for key, entry in self._entries.items()}

    def pin(self, key: Key) -> bool:
        """Hold a cached adapter for a request, counting it as used; False if not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.pins += 1
            entry.used = time.time()
        self._stamp(key)
        return True

    def unpin(self, key: Key) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1

    def touch(self, key: Key) -> bool:
        """Count a cached adapter as used now; False if not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.used = time.time()
        self._stamp(key)
        return True

    def usage(self) -> dict[str, int]:
        with self._lock:
            return {
                "adapters": len(self._entries),
                "bytes": sum(entry.size for entry in self._entries.values()),
                "max_bytes": self.max_bytes,
            }

    def room_for_another(self) -> bool:
        """Whether one more adapter, as big as the biggest here, fits without evicting."""
        with self._lock:
            sizes = [entry.size for entry in self._entries.values()]
        return sum(sizes) + max(sizes, default=0) <= self.max_bytes

    # -- adding and removing ---------------------------------------------------------------

    def add(self, key: Key, fetch: Callable[[Path], Path]) -> Path:
        """Fetch into a staging folder (`fetch` returns the adapter folder inside it), then
        rename it into place. It comes back pinned: the caller unpins it once it is read."""
        folder = self.folder(*key)
        if folder is None:
            raise ValueError(f"{key} names no folder inside the cache")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[1]}.", dir=folder.parent))
        try:
            fetched = fetch(staging)
            _discard(folder)
            fetched.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        size = _size(folder)
        with self._lock:
            held = self._entries[key].pins if key in self._entries else 0
            self._entries[key] = _Entry(size, time.time(), held + 1)
        return folder

    def make_room(self, keep: Key | None = None) -> list[Key]:
        """Evict least recently used adapters until the cache fits `max_bytes`; pinned ones
        and `keep` stay, even if that leaves it over. Returns what was evicted."""
        evicted = []
        with self._lock:
            total = sum(entry.size for entry in self._entries.values())
            idle = sorted(
                (entry.used, key)
                for key, entry in self._entries.items()
                if entry.pins == 0 and key != keep
            )
            for _, key in idle:
                if total <= self.max_bytes:
                    break
                total -= self._entries.pop(key).size
                evicted.append(key)
            if total > self.max_bytes:
                log.warning("adapter cache over its bound: every other adapter is in use")
        self._delete(evicted)
        return evicted

    def remove_unused(self, keys: Iterable[Key], older_than: float) -> list[Key]:
        """Delete these adapters where none holds them and none used them since `older_than`."""
        removed = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry.pins == 0 and entry.used < older_than:
                    del self._entries[key]
                    removed.append(key)
        self._delete(removed)
        return removed

    def forget_models(self, keep: set[str]) -> list[Key]:
        """Delete every model folder not named in `keep`, in use or not (opting out leaves
        no copy behind)."""
        with self._lock:
            gone = [key for key in self._entries if key[0] not in keep]
            for key in gone:
                del self._entries[key]
        for folder in self.root.iterdir():
            if folder.is_dir() and folder.name.startswith("doppel.") and folder.name not in keep:
                _discard(folder)
        return gone

    def _delete(self, keys: list[Key]) -> None:
        for key in keys:
            folder = self.folder(*key)
            if folder is not None:
                _discard(folder)

    def _stamp(self, key: Key) -> None:
        """The last use on disk too, for the order after a restart."""
        folder = self.folder(*key)
        if folder is not None:
            with contextlib.suppress(OSError):  # evicted meanwhile
                os.utime(folder)

    def _scan(self) -> None:
        """What a previous run left: complete adapters are counted, leftovers deleted."""
        for model in self.root.iterdir():
            if model.name.startswith(GONE):
                shutil.rmtree(model, ignore_errors=True)
            if not (model.is_dir() and model.name.startswith("doppel.")):
                continue
            for folder in model.iterdir():
                if folder.name.startswith(GONE):
                    shutil.rmtree(folder, ignore_errors=True)
                elif folder.is_dir() and (folder / PERSONA_FILE).is_file():
                    key = (model.name, folder.name)
                    self._entries[key] = _Entry(_size(folder), folder.stat().st_mtime)


def _discard(folder: Path) -> None:
    """Rename the folder away, then delete it: its path is free at once."""
    trash = folder.with_name(f"{GONE}{folder.name}.{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
