"""Export ingestion into a real SQLite store: threads, idempotence, edits and bad input."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from doppel.config import ExportSettings
from doppel.errors import DoppelError
from doppel.ingest import ingest_export
from doppel.store.database import Database
from doppel.store.models import Message, User
from tests.helpers import (
    doppel,
    require_shared_export,
    store_snapshot,
    write_export_folder,
    zip_folder,
)

LIMIT = 64 * 2**20
pytestmark = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
PARENT = "1704103200.000100"  # 2024-01-01 10:00 UTC
USERS = [
    {"id": "U1", "team_id": "T1", "name": "ann", "profile": {"display_name": "Annie"}},
    {"id": "U2", "team_id": "T1", "name": "bob", "real_name": "Bob B", "profile": {}},
]
CHANNELS = [{"id": "C1", "name": "general"}, {"id": "C2", "name": "quiet"}]


def day_files(text: str = "let us talk", edited: bool = False) -> dict:
    parent = {"type": "message", "user": "U1", "ts": PARENT, "thread_ts": PARENT, "text": text}
    parent |= {"reply_count": 7, "replies": [{"user": "U2", "ts": "x"}]}  # stale counts
    if edited:
        parent["edited"] = {"user": "U1", "ts": "1704110000.000000"}
    same_day = {"user": "U2", "ts": "1704103300.000100", "thread_ts": PARENT, "text": "r1"}
    next_day = {"user": "U2", "ts": "1704190000.000100", "thread_ts": PARENT, "text": "r2"}
    join = {"user": "U2", "ts": "1704100000.000100", "subtype": "channel_join", "text": "joined"}
    return {"general": {"2024-01-01": [join, parent, same_day], "2024-01-02": [next_day]}}


def make_export(root: Path, **kwargs: object) -> Path:
    files = {"channels": CHANNELS, "users": USERS} | kwargs
    days = files.pop("days", None) or day_files()
    return write_export_folder(root, days, **{k: v for k, v in files.items() if v is not None})


def snapshot(db: Database) -> dict[str, list]:
    return store_snapshot(db)


def ingest(db: Database, path: Path, **kwargs: object) -> dict:
    return ingest_export(db, path, max_bytes=kwargs.pop("max_bytes", LIMIT), **kwargs)


def test_folder_and_zip_ingest_rebuild_threads_across_days(db: Database, tmp_path: Path) -> None:
    folder = make_export(tmp_path / "export")
    counts = ingest(db, folder)
    assert counts == {"workspace": "T1", "channels": 2, "users": 2, "messages": 4, "threads": 1}
    with db.session() as session:
        parent = session.get(Message, ("T1", "C1", PARENT))
    assert (parent.reply_count, parent.latest_reply) == (2, "1704190000.000100")
    before = snapshot(db)
    assert ingest(db, zip_folder(folder, tmp_path / "export.zip")) == counts
    assert snapshot(db) == before  # re-ingesting changes nothing


def test_an_edited_message_updates_its_text(db: Database, tmp_path: Path) -> None:
    ingest(db, make_export(tmp_path / "v1"))
    ingest(db, make_export(tmp_path / "v2", days=day_files("let us talk (fixed)", edited=True)))
    with db.session() as session:
        parent = session.get(Message, ("T1", "C1", PARENT))
        total = len(session.scalars(select(Message)).all())
    assert (parent.text, parent.edited_ts) == ("let us talk (fixed)", "1704110000.000000")
    assert total == 4


def test_users_come_from_messages_without_users_json(db: Database, tmp_path: Path) -> None:
    message = {
        "user": "U9",
        "ts": "1704103200.000100",
        "text": "hi",
        "team": "T9",
        "user_profile": {"name": "zed", "real_name": "Zed Z", "display_name": "zz"},
    }
    folder = make_export(tmp_path / "e", users=None, days={"general": {"2024-01-01": [message]}})
    assert ingest(db, folder)["workspace"] == "T9"
    with db.session() as session:
        user = session.get(User, ("T9", "U9"))
    assert (user.name, user.real_name, user.display_name) == ("zed", "Zed Z", "zz")


def test_workspace_id_comes_from_the_flag_when_the_export_lacks_it(
    db: Database, tmp_path: Path
) -> None:
    anonymous = [{"id": "U1", "name": "ann"}]
    folder = make_export(tmp_path / "e", users=anonymous)
    with pytest.raises(DoppelError, match="--workspace"):
        ingest(db, folder)
    assert ingest(db, folder, workspace="T42")["workspace"] == "T42"
    with pytest.raises(DoppelError, match="belongs to workspace T1"):
        ingest(db, make_export(tmp_path / "f"), workspace="T42")


def test_private_conversations_only_when_asked(db: Database, tmp_path: Path) -> None:
    secret = {"user": "U1", "ts": "1704103200.000100", "text": "psst"}
    days = day_files() | {"secret": {"2024-01-01": [secret]}, "D1": {"2024-01-01": [secret]}}
    folder = make_export(
        tmp_path / "e",
        days=days,
        groups=[{"id": "G1", "name": "secret"}],
        dms=[{"id": "D1", "members": ["U1", "U2"]}],
    )
    assert ingest(db, folder)["channels"] == 2
    assert ingest(db, folder, include_private=True)["channels"] == 4
    with db.session() as session:
        assert session.get(Message, ("T1", "D1", "1704103200.000100")).text == "psst"


@pytest.mark.parametrize(
    ("breaker", "error"),
    [
        (lambda root: root / "channels.json", "does not exist"),
        (lambda root: _write(root / "notes.txt", "hello"), "not a Slack export"),
        (lambda root: _zip(root / "a.zip", {"users.json": "[]"}), "no channels.json"),
        (
            lambda root: _zip(root / "a.zip", {"channels.json": "[]", "../../evil.json": "[]"}),
            "path traversal",
        ),
        (lambda root: _bad_day(root), r"general/2024-01-02\.json"),
        (lambda root: _zip(root / "a.zip", {"channels.json": "{oops"}), "malformed JSON"),
    ],
)
def test_bad_exports_fail_clearly_and_keep_the_store(
    db: Database, tmp_path: Path, breaker, error: str
) -> None:
    ingest(db, make_export(tmp_path / "good"))
    before = snapshot(db)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(DoppelError, match=error):
        ingest(db, breaker(bad))
    assert snapshot(db) == before


def test_oversized_zip_is_refused(db: Database, tmp_path: Path) -> None:
    big = _zip(tmp_path / "big.zip", {"channels.json": "[]", "general/2024-01-01.json": " " * 5000})
    with pytest.raises(DoppelError, match="over the limit"):
        ingest(db, big, max_bytes=4000)


def test_import_is_one_transaction(db: Database, tmp_path: Path, monkeypatch) -> None:
    import doppel.ingest

    def fail(*_args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(doppel.ingest, "save_messages", fail)
    with pytest.raises(RuntimeError):
        ingest(db, make_export(tmp_path / "e"))
    assert all(rows == [] for rows in snapshot(db).values())


def test_real_export_houstondatavis(db: Database) -> None:
    counts = ingest(db, require_shared_export())
    assert counts == {
        "workspace": "T061A2UFL",
        "channels": 16,
        "users": 71,
        "messages": 1382,
        "threads": 0,
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _zip(path: Path, files: dict[str, str], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def _bad_day(root: Path) -> Path:
    folder = make_export(root / "e")
    (folder / "general" / "2024-01-02.json").write_text(json.dumps({"not": "a list"}))
    return folder


# -- Every field the store uses is type-checked, before anything is stored ---------------

GOOD = {"type": "message", "user": "U1", "ts": "1704103200.000100", "text": "hello"}


def export_with(root: Path, *messages: object) -> Path:
    """An export whose general/2016-03-01.json holds two good messages, then `messages`."""
    later = GOOD | {"ts": "1704103300.000100"}
    return make_export(root, days={"general": {"2016-03-01": [GOOD, later, *messages]}})


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"ts": "not-a-ts"}, 'ts "not-a-ts" is not a Slack timestamp'),
        ({"ts": 1704103200.0001}, "ts is a number, expected a string"),
        ({"thread_ts": "yesterday"}, 'thread_ts "yesterday" is not a Slack timestamp'),
        ({"text": ["hi"]}, "text is a list, expected a string"),
        ({"text": "a\u0000b"}, "text contains a NUL character"),
        ({"text": "a\ud800b"}, "text holds an unpaired surrogate"),
        ({"user": 7}, "user is a number, expected a string"),
        ({"user": "U" * 40}, "user is longer than 32 characters"),
        ({"subtype": {"x": 1}}, "subtype is an object, expected a string"),
        ({"edited": "yes"}, "edited is a string, expected an object"),
        ({"edited": {"ts": "now"}}, 'edited.ts "now" is not a Slack timestamp'),
        ({"files": [{"id": "F1"}, "x"]}, r"files\[1\] is a string, expected an object"),
        ({"reply_count": "7"}, "reply_count is a string, expected an integer"),
        ({"reply_count": 2**40}, "reply_count 1099511627776 is out of range"),
        ({"user_profile": []}, "user_profile is a list, expected an object"),
    ],
)
def test_a_bad_message_field_names_the_file_and_message_and_keeps_the_store(
    db: Database, tmp_path: Path, bad: dict, error: str
) -> None:
    ingest(db, make_export(tmp_path / "good"))
    before = snapshot(db)
    folder = export_with(tmp_path / "bad", GOOD | {"ts": "1704103400.000100"} | bad)
    with pytest.raises(DoppelError, match=r"^general/2016-03-01\.json, message 3: " + error):
        ingest(db, folder)
    assert snapshot(db) == before


def test_the_cli_says_what_is_wrong_in_one_line_without_a_traceback(
    db: Database, tmp_path: Path
) -> None:
    folder = export_with(tmp_path / "bad", GOOD | {"ts": "not-a-ts"})
    result = doppel("ingest", "export", str(folder), ok=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert 'general/2016-03-01.json, message 3: ts "not-a-ts" is not a Slack timestamp' in (
        " ".join(result.stderr.split())
    )


def test_messages_need_not_carry_what_slack_leaves_out(db: Database, tmp_path: Path) -> None:
    """Unknown fields pass through, and null stands for absent, as in real exports."""
    message = GOOD | {"ts": "1704103400.000100", "bot_id": None, "blocks": [{"type": "x"}]}
    counts = ingest(db, export_with(tmp_path / "e", message))
    assert counts["messages"] == 3


@pytest.mark.parametrize(
    ("files", "error"),
    [
        ({"channels": [{"id": "C1", "name": "general"}, {"id": "C1", "name": "x"}]}, "twice"),
        ({"channels": [{"id": "C1", "name": "general", "is_archived": "no"}]}, "is_archived"),
        ({"channels": [{"id": "C1"}]}, r"channels\.json, channel 1: name is missing"),
        ({"users": [{"id": "U1", "team_id": ["T1"]}]}, r"users\.json, user 1: team_id is a list"),
        ({"users": [{"id": "U1", "profile": "ann"}]}, "profile is a string, expected an object"),
        ({"users": USERS + USERS[:1]}, "users.json lists user U1 twice"),
    ],
)
def test_bad_channels_and_users_are_refused_too(
    db: Database, tmp_path: Path, files: dict, error: str
) -> None:
    with pytest.raises(DoppelError, match=error):
        ingest(db, make_export(tmp_path / "e", **files))
    assert all(rows == [] for rows in snapshot(db).values())


def test_a_workspace_flag_the_store_cannot_hold_is_refused(db: Database, tmp_path: Path) -> None:
    folder = make_export(tmp_path / "e", users=[{"id": "U1", "name": "ann"}])
    with pytest.raises(DoppelError, match="is not a Slack workspace id"):
        ingest(db, folder, workspace="T" * 40)
    assert all(rows == [] for rows in snapshot(db).values())


# -- Memory stays bounded ------------------------------------------------------------------


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(
    db: Database, tmp_path: Path
) -> None:
    folder = export_with(tmp_path / "e")
    (folder / "general" / "2016-03-02.json").write_text(json.dumps([GOOD]) + " " * 2**21)
    limits = ExportSettings(max_file_mb=1)
    with pytest.raises(DoppelError, match=r"2016-03-02\.json is 2\.0 MiB, over the limit of 1 MiB"):
        ingest(db, folder, limits=limits)
    with pytest.raises(DoppelError, match="over the limit of 1 MiB per file"):
        ingest(db, zip_folder(folder, tmp_path / "e.zip"), limits=limits)
    assert all(rows == [] for rows in snapshot(db).values())


def test_a_zip_bomb_is_refused_by_its_compression_ratio(db: Database, tmp_path: Path) -> None:
    bomb = {
        "channels.json": json.dumps(CHANNELS),
        "general/2016-03-01.json": "[" + " " * 2**22 + "]",
    }
    with pytest.raises(DoppelError, match=r"general/2016-03-01\.json unpacks \d+ times"):
        ingest(db, _zip(tmp_path / "bomb.zip", bomb, zipfile.ZIP_DEFLATED))
    assert all(rows == [] for rows in snapshot(db).values())


def test_json_nested_too_deep_is_refused_before_parsing(db: Database, tmp_path: Path) -> None:
    nested = GOOD | {"ts": "1704103400.000100", "blocks": [[[[[[[["deep"]]]]]]]]}
    folder = export_with(tmp_path / "e", nested)
    with pytest.raises(DoppelError, match=r"2016-03-01\.json nests lists or objects more than 8"):
        ingest(db, folder, limits=ExportSettings(max_json_depth=8))
    assert ingest(db, folder, limits=ExportSettings(max_json_depth=12))["messages"] == 3
    (folder / "general" / "2016-03-01.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DoppelError, match="more than 64 deep"):
        ingest(db, folder)


def test_a_corrupt_zip_member_is_a_clear_error(db: Database, tmp_path: Path) -> None:
    path = zip_folder(make_export(tmp_path / "e"), tmp_path / "e.zip")
    data = bytearray(path.read_bytes())
    start = data.index(b"general/2024-01-01.json") + len("general/2024-01-01.json")
    data[start : start + 20] = bytes(20)  # the first member's data, zeroed
    path.write_bytes(bytes(data))
    with pytest.raises(DoppelError, match=r"cannot unpack general/2024-01-01\.json: Bad CRC"):
        ingest(db, path)
