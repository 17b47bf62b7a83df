"""Read a standard Slack workspace export (a ZIP or an unzipped folder).

An export holds `channels.json`, usually `users.json`, optionally `groups.json`,
`dms.json` and `mpims.json`, and one folder per conversation with one JSON file per
day. Everything is read and validated in memory before anything is stored, so a bad
file never leaves a half-imported workspace behind.

Exports come from outside, so nothing in one is trusted: each file's size (and in a ZIP,
its compression ratio) is checked before it is read, its nesting depth before it is
parsed, and every field the store uses is type-checked after (`ExportMessage` and its
siblings). A broken or hostile export ends in one line naming the file and the entry,
never in a traceback, a row the store cannot hold, or an exhausted machine.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)
from pydantic_core import ErrorDetails

from doppel.config import ExportSettings
from doppel.errors import DoppelError
from doppel.types import SlackDict

# Index file -> (flags to mark its conversations with, how its folders are named).
PRIVATE_INDEXES = {
    "groups.json": ({"is_private": True}, "name"),
    "mpims.json": ({"is_mpim": True, "is_private": True}, "name"),
    "dms.json": ({"is_im": True, "is_private": True}, "id"),
}
RETRY_HINT = "re-download the export, or fix or remove that file"
# What zipfile raises for a damaged, truncated, encrypted or oddly compressed archive.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OSError,
)

# -- The fields the store uses, typed as the store holds them ---------------------------

TS_PATTERN = r"^[0-9]+\.[0-9]+$"  # "1704103200.000100": Slack's timestamps, which are ids
# No NUL: PostgreSQL text cannot hold one. (Any constrained str also refuses an unpaired
# surrogate, which no database can encode.)
PLAIN_PATTERN = r"^[^\x00]*$"
SlackTs = Annotated[str, StringConstraints(pattern=TS_PATTERN, max_length=32)]
SlackId = Annotated[str, StringConstraints(pattern=PLAIN_PATTERN, max_length=32)]
PrimaryId = Annotated[SlackId, StringConstraints(min_length=1)]  # a channel's or user's own id
Name = Annotated[str, StringConstraints(pattern=PLAIN_PATTERN, max_length=255)]
Text = Annotated[str, StringConstraints(pattern=PLAIN_PATTERN)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]  # an SQL INTEGER


class SlackObject(BaseModel):
    """The fields we use are type-checked, strictly; Slack's many others pass through."""

    model_config = ConfigDict(extra="allow", strict=True)


class Profile(SlackObject):
    name: Name | None = None
    real_name: Name | None = None
    display_name: Name | None = None
    image_72: Text | None = None
    image_192: Text | None = None


class Edited(SlackObject):
    ts: SlackTs | None = None


class ExportMessage(SlackObject):
    ts: SlackTs
    thread_ts: SlackTs | None = None
    latest_reply: SlackTs | None = None
    user: SlackId | None = None
    bot_id: SlackId | None = None
    subtype: Annotated[Name, StringConstraints(max_length=64)] | None = None
    text: Text | None = None
    edited: Edited | None = None
    files: list[dict[str, Any]] | None = None
    replies: list[dict[str, Any]] | None = None
    reply_count: Count | None = None
    user_profile: Profile | None = None
    team: SlackId | None = None
    user_team: SlackId | None = None


class Topic(SlackObject):
    value: Text | None = None


def _topic_object(value: Any) -> Any:
    """Older exports give a topic or purpose as a bare string."""
    return {"value": value} if isinstance(value, str) else value


class ExportChannel(SlackObject):
    id: PrimaryId
    name: Name | None = None
    user: SlackId | None = None  # a DM's other person
    members: list[SlackId] | None = None
    topic: Annotated[Topic | None, BeforeValidator(_topic_object)] = None
    purpose: Annotated[Topic | None, BeforeValidator(_topic_object)] = None
    is_archived: bool | None = None
    is_private: bool | None = None
    is_group: bool | None = None
    is_im: bool | None = None
    is_mpim: bool | None = None


class ExportUser(SlackObject):
    id: PrimaryId
    team_id: SlackId | None = None
    name: Name | None = None
    real_name: Name | None = None
    profile: Profile | None = None
    is_bot: bool | None = None
    deleted: bool | None = None


MESSAGES = TypeAdapter(list[ExportMessage])
CHANNELS = TypeAdapter(list[ExportChannel])
USERS = TypeAdapter(list[ExportUser])


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
    """Uniform, bounded read access to the files of a ZIP or a folder, below the export's
    root."""

    def __init__(self, path: Path, max_bytes: int, limits: ExportSettings) -> None:
        self.path = path
        self.limits = limits
        self.zip: zipfile.ZipFile | None = None
        if path.is_dir():
            self.names = {
                p.relative_to(path).as_posix() for p in path.rglob("*.json") if p.is_file()
            }
        elif path.is_file() and zipfile.is_zipfile(path):
            try:
                self.zip = zipfile.ZipFile(path)
            except ZIP_ERRORS as error:
                raise DoppelError(f"{path} is not a readable ZIP: {error}", RETRY_HINT) from None
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
        """Refuse, before reading anything, unsafe paths, zip bombs and oversized exports."""
        assert self.zip is not None
        total = 0
        for info in self.zip.infolist():
            name = _printable(info.filename)
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            unsafe = info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename
            if unsafe or not info.filename:
                raise DoppelError(
                    f"{self.path} contains an unsafe path {name} (path traversal)",
                    "only import exports downloaded from Slack",
                )
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > self.limits.max_compression_ratio:
                raise DoppelError(
                    f"{self.path}: {name} unpacks {ratio:.0f} times its packed size, over "
                    f"the limit of {self.limits.max_compression_ratio:g} (a zip bomb?)",
                    "raise export.max_compression_ratio (DOPPEL_EXPORT__MAX_COMPRESSION_RATIO) "
                    "if it is genuine",
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
            found = ", ".join(_printable(name) for name in sorted(self.names)[:5])
            raise DoppelError(
                f"{self.path} is not a Slack export: it has no channels.json "
                f"(found: {found or 'no JSON files'})",
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
        """One file's JSON, refused before reading when too big and before parsing when
        nested too deep."""
        raw = self._read(name, self.limits.max_file_mb * 2**20)
        if _too_deep(raw, self.limits.max_json_depth):
            raise DoppelError(
                f"{_printable(name)} nests lists or objects more than "
                f"{self.limits.max_json_depth} deep",
                "raise export.max_json_depth (DOPPEL_EXPORT__MAX_JSON_DEPTH) if it is genuine",
            )
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError
            raise DoppelError(
                f"malformed JSON in export file {_printable(name)}: {error}", RETRY_HINT
            ) from None

    def _read(self, name: str, max_file_bytes: int) -> bytes:
        if self.zip is None:
            file = self.path / self.root / name
            self._check_size(name, file.stat().st_size, max_file_bytes)
            return file.read_bytes()
        info = self.zip.getinfo(self.root + name)
        # The size the ZIP declares is also the most zipfile reads, whatever the data holds.
        self._check_size(name, info.file_size, max_file_bytes)
        try:
            return self.zip.read(info)
        except ZIP_ERRORS as error:
            raise DoppelError(f"cannot unpack {_printable(name)}: {error}", RETRY_HINT) from None

    @staticmethod
    def _check_size(name: str, size: int, max_file_bytes: int) -> None:
        if size > max_file_bytes:
            raise DoppelError(
                f"{_printable(name)} is {size / 2**20:.1f} MiB, over the limit of "
                f"{max_file_bytes // 2**20} MiB per file",
                "raise export.max_file_mb (DOPPEL_EXPORT__MAX_FILE_MB) if it is genuine",
            )

    def load_list(self, name: str, schema: TypeAdapter[Any], entry: str) -> list[SlackDict]:
        """A JSON list of objects, checked against `schema`; the objects as they were."""
        data = self.load(name)
        try:
            schema.validate_python(data)
        except ValidationError as error:
            raise _invalid(name, entry, error) from None
        return data

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def read_export(
    path: Path,
    *,
    include_private: bool = False,
    max_bytes: int | None = None,
    limits: ExportSettings | None = None,
) -> SlackExport:
    """Read an export; private channels, DMs and group DMs only when asked.

    `limits` are the `export:` settings; `max_bytes`, when given, caps the unpacked export
    in place of their `max_unzipped_mb`.
    """
    limits = limits or ExportSettings()
    if max_bytes is None:
        max_bytes = limits.max_unzipped_mb * 2**20
    files = _Files(Path(path), max_bytes, limits)
    try:
        channels = _read_channels(files, include_private)
        messages = {
            channel["id"]: _read_messages(files, channel["_folder"]) for channel in channels
        }
        for channel in channels:
            del channel["_folder"]
        users = files.load_list("users.json", USERS, "user") if files.has("users.json") else None
    finally:
        files.close()
    if users is None:
        users = _users_from_messages(messages)
    _refuse_duplicates("users.json", "user", [user["id"] for user in users])
    return SlackExport(
        workspace_id=_workspace_id(users, messages),
        channels=channels,
        users=users,
        messages=messages,
    )


def _read_channels(files: _Files, include_private: bool) -> list[SlackDict]:
    indexes: dict[str, tuple[dict[str, bool], str]] = {"channels.json": ({}, "name")}
    if include_private:
        indexes |= {name: index for name, index in PRIVATE_INDEXES.items() if files.has(name)}
    channels = []
    for index, (flags, folder_key) in indexes.items():
        for position, channel in enumerate(files.load_list(index, CHANNELS, "channel"), 1):
            if not channel.get(folder_key):
                raise DoppelError(
                    f"{index}, channel {position}: {folder_key} is missing, and it names the "
                    "channel's folder",
                    RETRY_HINT,
                )
            channels.append(dict(channel, **flags, _folder=channel[folder_key]))
    _refuse_duplicates("the export", "channel", [channel["id"] for channel in channels])
    return channels


def _read_messages(files: _Files, folder: str) -> list[SlackDict]:
    by_ts: dict[str, SlackDict] = {}
    for name in files.day_files(folder):
        for message in files.load_list(name, MESSAGES, "message"):
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


# -- Errors that name the file, the entry and the field ---------------------------------

EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}


def _invalid(name: str, entry: str, error: ValidationError) -> DoppelError:
    """The first problem, as `general/2024-01-01.json, message 3: ts "x" is not a Slack
    timestamp`. Values are shown only where they cannot be message content."""
    first = error.errors(include_url=False)[0]
    where = _printable(name)
    if not first["loc"]:
        found = _json_type(first["input"])
        return DoppelError(f"{where}: expected a JSON list of {entry}s, found {found}", RETRY_HINT)
    position, *path = first["loc"]
    where = f"{where}, {entry} {int(position) + 1}"
    if path:  # `files[0].name`: fields by name, list items by their JSON index
        where += ": " + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)[1:]
    return DoppelError(f"{where} {_problem(first)}", RETRY_HINT)


def _problem(error: ErrorDetails) -> str:
    kind, value, context = error["type"], error["input"], error.get("ctx") or {}
    if kind == "missing":
        return "is missing"
    if kind == "string_pattern_mismatch" and context.get("pattern") == TS_PATTERN:
        return f"{_shown(value)} is not a Slack timestamp"
    if kind == "string_pattern_mismatch":
        return "contains a NUL character"
    if kind == "string_unicode":
        return "holds an unpaired surrogate, which no database can store"
    if kind == "string_too_long":
        return f"is longer than {context['max_length']} characters"
    if kind == "string_too_short":
        return "is empty"
    if kind in {"greater_than_equal", "less_than_equal"}:
        return f"{_shown(value)} is out of range"
    if kind in EXPECTED:
        return f"is {_json_type(value)}, expected {EXPECTED[kind]}"
    return error["msg"]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    for kind, label in ((dict, "an object"), (list, "a list"), (str, "a string")):
        if isinstance(value, kind):
            return label
    return "a number"


def _shown(value: Any) -> str:
    """A short JSON rendering of a bad timestamp or count, for the error line."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:39] + "…"


def _printable(name: str) -> str:
    """A file name fit for a one-line error, whatever characters it holds."""
    return name if name.isprintable() else ascii(name)


def _refuse_duplicates(source: str, entry: str, ids: list[str]) -> None:
    """Slack never lists one id twice, and one upsert could not store both."""
    twice = [item for item, count in Counter(ids).items() if count > 1]
    if twice:
        raise DoppelError(f"{source} lists {entry} {_printable(twice[0])} twice", RETRY_HINT)


# -- Nesting depth, before parsing ------------------------------------------------------

NOT_STRUCTURE = bytes(set(range(256)) - set(b'[]{}"'))  # all but quotes and brackets
JSON_STRING = re.compile(rb'"[^"]*"')
INNERMOST = re.compile(rb"\[\]|\{\}")


def _too_deep(raw: bytes, limit: int) -> bool:
    """Whether lists and objects nest more than `limit` deep, found without parsing.

    Python's json has no depth limit: a few MB of `[[[[` exhaust its recursion. Escaped
    backslashes and quotes go first, then every byte but quotes and brackets, then the
    strings; that leaves the brackets. Each pass then removes the innermost pairs: what is
    left after `limit` passes nests deeper. Malformed JSON is left to the parser.
    """
    skeleton = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, NOT_STRUCTURE)
    # Two adjacent quotes close one string and open the next, or hold nothing: either way
    # dropping them keeps what is in strings in strings, and most strings go at C speed.
    brackets = JSON_STRING.sub(b"", skeleton.replace(b'""', b""))
    for _ in range(limit):
        if not brackets:
            return False
        brackets, removed = INNERMOST.subn(b"", brackets)
        if not removed:
            return False  # unbalanced: json.loads says where
    return bool(brackets) and INNERMOST.search(brackets) is not None
