"""Read a standard Slack workspace export (a ZIP or an unzipped folder).

An export holds `channels.json`, usually `users.json`, optionally `groups.json`,
`dms.json` and `mpims.json`, and one folder per conversation with one JSON file per
day. Everything is read and validated in memory before anything is stored, so a bad
file never leaves a half-imported workspace behind.
"""

from __future__ import annotations

import json
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from doppel.errors import DoppelError
from doppel.types import SlackDict

# Index file -> (flags to mark its conversations with, how its folders are named).
PRIVATE_INDEXES = {
    "groups.json": ({"is_private": True}, "name"),
    "mpims.json": ({"is_mpim": True, "is_private": True}, "name"),
    "dms.json": ({"is_im": True, "is_private": True}, "id"),
}


@dataclass
class SlackExport:
    """A whole workspace in Slack's own JSON shapes, with threads rebuilt."""

    workspace_id: str | None
    channels: list[SlackDict]
    users: list[SlackDict]
    messages: dict[str, list[SlackDict]] = field(default_factory=dict)  # channel id -> by ts

    def message_count(self) -> int:
        return sum(len(messages) for messages in self.messages.values())


class _Files:
    """Uniform read access to the files of a ZIP or a folder, below the export's root."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.names = {
                p.relative_to(path).as_posix() for p in path.rglob("*.json") if p.is_file()
            }
        elif path.is_file() and zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            self._check_zip(max_bytes)
            self.names = {info.filename for info in self.zip.infolist() if not info.is_dir()}
        elif not path.exists():
            raise DoppelError(f"{path} does not exist", "pass the path of a Slack export")
        else:
            raise DoppelError(
                f"{path} is not a Slack export: expected a .zip file or a folder",
                "download the export from Slack's 'Import/Export Data' page",
            )
        self.root = self._find_root()
        self.folders = self._index_day_files()

    def _check_zip(self, max_bytes: int) -> None:
        assert self.zip is not None
        total = 0
        for info in self.zip.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
                raise DoppelError(
                    f"{self.path} contains an unsafe path '{info.filename}' (path traversal)",
                    "only import exports downloaded from Slack",
                )
            total += info.file_size
        if total > max_bytes:
            raise DoppelError(
                f"{self.path} unpacks to {total / 2**20:.0f} MiB, over the limit of "
                f"{max_bytes / 2**20:.0f} MiB",
                "raise export.max_unzipped_mb (DOPPEL_EXPORT__MAX_UNZIPPED_MB) if it is genuine",
            )

    def _find_root(self) -> str:
        """Exports are sometimes zipped with one enclosing folder; find `channels.json`."""
        candidates = sorted(
            (name for name in self.names if PurePosixPath(name).name == "channels.json"),
            key=len,
        )
        if not candidates:
            found = ", ".join(sorted(self.names)[:5]) or "no JSON files"
            raise DoppelError(
                f"{self.path} is not a Slack export: it has no channels.json (found: {found})",
                "pass the ZIP from Slack's export page, or the folder it unpacks to",
            )
        parent = str(PurePosixPath(candidates[0]).parent)
        return "" if parent == "." else parent + "/"

    def has(self, name: str) -> bool:
        return self.root + name in self.names

    def _index_day_files(self) -> dict[str, list[str]]:
        """Day files by conversation folder, found in one pass over the archive."""
        folders: dict[str, list[str]] = {}
        for name in self.names:
            relative = name[len(self.root) :]
            folder, _, day = relative.partition("/")
            if name.startswith(self.root) and day and "/" not in day and day.endswith(".json"):
                folders.setdefault(folder, []).append(relative)
        return {folder: sorted(days) for folder, days in folders.items()}

    def day_files(self, folder: str) -> list[str]:
        return self.folders.get(folder, [])

    def load(self, name: str) -> Any:
        try:
            if self.zip is not None:
                raw = self.zip.read(self.root + name)
            else:
                raw = (self.path / self.root / name).read_bytes()
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DoppelError(
                f"malformed JSON in export file '{name}': {error}",
                "re-download the export or remove that file",
            ) from None

    def load_list(self, name: str) -> list[SlackDict]:
        data = self.load(name)
        if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
            raise DoppelError(
                f"malformed export file '{name}': expected a JSON list of objects",
                "re-download the export or remove that file",
            )
        return data

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def read_export(path: Path, *, include_private: bool = False, max_bytes: int) -> SlackExport:
    """Read an export; private channels, DMs and group DMs only when asked."""
    files = _Files(Path(path), max_bytes)
    try:
        channels = _read_channels(files, include_private)
        messages = {
            channel["id"]: _read_messages(files, channel["_folder"]) for channel in channels
        }
        for channel in channels:
            del channel["_folder"]
        users = files.load_list("users.json") if files.has("users.json") else None
    finally:
        files.close()
    if users is None:
        users = _users_from_messages(messages)
    return SlackExport(
        workspace_id=_workspace_id(users, messages),
        channels=channels,
        users=users,
        messages=messages,
    )


def _read_channels(files: _Files, include_private: bool) -> list[SlackDict]:
    channels = [
        dict(channel, _folder=channel.get("name")) for channel in files.load_list("channels.json")
    ]
    if include_private:
        for index, (flags, folder_key) in PRIVATE_INDEXES.items():
            if files.has(index):
                for channel in files.load_list(index):
                    channels.append(dict(channel, **flags, _folder=channel.get(folder_key)))
    for position, channel in enumerate(channels):
        if not channel.get("id") or not channel.get("_folder"):
            raise DoppelError(
                f"malformed channel entry #{position} in the export: it needs an id and a name",
                "re-download the export",
            )
    return channels


def _read_messages(files: _Files, folder: str) -> list[SlackDict]:
    by_ts: dict[str, SlackDict] = {}
    for name in files.day_files(folder):
        for position, message in enumerate(files.load_list(name)):
            if not isinstance(message.get("ts"), str):
                raise DoppelError(
                    f"malformed export file '{name}': message #{position} has no 'ts'",
                    "re-download the export or remove that file",
                )
            by_ts[message["ts"]] = message
    return rebuild_threads(sorted(by_ts.values(), key=lambda message: message["ts"]))


def rebuild_threads(messages: list[SlackDict]) -> list[SlackDict]:
    """Recount each parent's replies from the replies present, wherever their day file was."""
    replies: dict[str, list[str]] = {}
    for message in messages:
        thread_ts = message.get("thread_ts")
        if thread_ts and thread_ts != message["ts"]:
            replies.setdefault(thread_ts, []).append(message["ts"])
    for message in messages:
        if message.get("thread_ts") == message["ts"] or message["ts"] in replies:
            found = replies.get(message["ts"], [])
            message["thread_ts"] = message["ts"] if found else message.get("thread_ts")
            message["reply_count"] = len(found)
            message["latest_reply"] = max(found) if found else None
            message.pop("replies", None)
    return messages


def _users_from_messages(messages: dict[str, list[SlackDict]]) -> list[SlackDict]:
    """Without users.json, take each author's profile from their messages."""
    users: dict[str, SlackDict] = {}
    for channel_messages in messages.values():
        for message in channel_messages:
            user_id = message.get("user")
            if not user_id or message.get("bot_id"):
                continue
            profile = message.get("user_profile") or {}
            known = users.setdefault(user_id, {"id": user_id, "name": user_id, "profile": {}})
            if profile:
                known["name"] = profile.get("name") or known["name"]
                known["real_name"] = profile.get("real_name")
                known["profile"] = profile
            if message.get("team") or message.get("user_team"):
                known["team_id"] = message.get("user_team") or message.get("team")
    return list(users.values())


def _workspace_id(users: list[SlackDict], messages: dict[str, list[SlackDict]]) -> str | None:
    teams = Counter(user["team_id"] for user in users if user.get("team_id"))
    if not teams:
        teams = Counter(
            message["team"]
            for channel_messages in messages.values()
            for message in channel_messages
            if message.get("team")
        )
    return teams.most_common(1)[0][0] if teams else None
