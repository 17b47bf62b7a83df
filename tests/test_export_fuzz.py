"""Property-based tests of the export reader: whatever an export holds (random JSON in its
day files, random file names, random bytes), reading it ends in success or one
`DoppelError`, never a traceback. What reads successfully is stored in a real SQLite store
and segmented, as a dataset build would."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from doppel.config import ExportSettings
from doppel.dataset.build import load_conversations
from doppel.errors import DoppelError
from doppel.ingest import ingest_export
from doppel.slack.export import read_export
from doppel.store.database import Database
from doppel.store.lookup import resolve_workspace
from tests.helpers import write_export_folder

# Modest counts: each example writes an export, so the module takes seconds.
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
LIMITS = ExportSettings(max_json_depth=8)
CHANNELS = [{"id": "C1", "name": "general"}]
USERS = [{"id": "U1", "team_id": "T1", "name": "ann"}]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
texts = st.text(max_size=20)
timestamps = st.sampled_from(["1.5", "2.5", "1704103200.000100"]) | st.from_regex(
    r"\A[0-9]{1,12}\.[0-9]{1,6}\Z"
)
objects = st.dictionaries(texts, json_values, max_size=3)
# Each field a message may carry, with values of the right type.
WELL_TYPED = {
    "type": st.just("message"),
    "user": st.sampled_from(["U1", "U2"]) | texts,
    "text": texts,
    "subtype": st.sampled_from(["channel_join", "thread_broadcast", "bot_message"]) | texts,
    "bot_id": texts,
    "thread_ts": timestamps,
    "latest_reply": timestamps,
    "edited": st.fixed_dictionaries({"ts": timestamps}),
    "files": st.lists(objects, max_size=2),
    "replies": st.lists(objects, max_size=2),
    "reply_count": st.integers(min_value=0, max_value=50),
    "user_profile": st.dictionaries(st.sampled_from(["name", "real_name", "display_name"]), texts),
    "team": texts,
    "user_team": texts,
}
well_typed = st.fixed_dictionaries({"ts": timestamps}, optional=WELL_TYPED)
one_field_off = st.builds(
    lambda message, name, value: message | {name: value},
    well_typed,
    st.sampled_from(("ts", *WELL_TYPED)),
    json_values,
)
day_files = (
    st.lists(well_typed, max_size=6)
    | st.lists(well_typed | one_field_off | json_values, max_size=6)
    | json_values
)


def reads_or_refuses(path: Path, db: Database | None = None) -> None:
    """Read (and, given a store, ingest and segment) the export; only a DoppelError may
    stop it."""
    try:
        if db is None:
            read_export(path, include_private=True, limits=LIMITS)
            return
        ingest_export(db, path, limits=LIMITS)
    except DoppelError as error:
        assert "\n" not in str(error), str(error)
        return
    with db.session() as session:
        load_conversations(session, resolve_workspace(session, "T1"), 30)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
@FUZZ
@given(days=st.lists(day_files, min_size=1, max_size=3))
def test_any_json_in_day_files_is_stored_or_refused(db: Database, days: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = {f"2024-01-0{i + 1}": content for i, content in enumerate(days)}
        folder = write_export_folder(
            Path(tmp) / "e", {"general": files}, channels=CHANNELS, users=USERS
        )
        reads_or_refuses(folder, db)


@FUZZ
@given(channels=json_values, users=json_values, dms=json_values)
def test_any_json_in_index_files_is_read_or_refused(channels, users, dms) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_export_folder(
            Path(tmp) / "e",
            {"general": {"2024-01-01": [{"ts": "1.5", "user": "U1", "text": "hi"}]}},
            channels=channels,
            users=users,
            dms=dms,
        )
        reads_or_refuses(folder)


@FUZZ
@given(
    members=st.dictionaries(
        st.text(
            st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
            min_size=1,
            max_size=30,
        )
        | st.sampled_from(["channels.json", "users.json", "general/2024-01-01.json"]),
        st.binary(max_size=80) | json_values.map(lambda value: json.dumps(value).encode()),
        max_size=6,
    )
)
def test_any_file_names_and_bytes_in_a_zip_are_read_or_refused(members: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "e.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)
        reads_or_refuses(path)


@FUZZ
@given(data=st.binary(max_size=300) | st.binary(max_size=300).map(b"PK\x03\x04".__add__))
def test_random_bytes_as_the_export_are_refused(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "e.zip"
        path.write_bytes(data)
        reads_or_refuses(path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=8))
def test_a_damaged_zip_is_read_or_refused(flips: list[tuple[int, int]]) -> None:
    message = {"ts": "1704103200.000100", "user": "U1", "text": "hello " * 20}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "e.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("channels.json", json.dumps(CHANNELS))
            archive.writestr("general/2024-01-01.json", json.dumps([message]))
        data = bytearray(path.read_bytes())
        for position, value in flips:
            data[position % len(data)] = value
        path.write_bytes(data)
        reads_or_refuses(path)


def depth(value: object) -> int:
    """How deep lists and objects nest in `value`, the way Python sees it once parsed."""
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@FUZZ
@given(
    value=st.recursive(
        st.text(alphabet='[]{}"\\ab', max_size=6) | st.integers(),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=30,
    ),
    limit=st.integers(min_value=2, max_value=6),
    ascii_only=st.booleans(),
)
@example(value=[[['"']]], limit=2, ascii_only=True)  # an escaped quote
@example(value=[["\\", [[]]]], limit=3, ascii_only=True)  # an escaped backslash
def test_the_depth_limit_counts_brackets_not_characters_in_strings(
    value: object, limit: int, ascii_only: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_export_folder(Path(tmp) / "e", {}, channels=CHANNELS)
        (folder / "general").mkdir()
        day = json.dumps(value, ensure_ascii=ascii_only)
        (folder / "general" / "2024-01-01.json").write_text(day, encoding="utf-8")
        try:
            read_export(folder, limits=ExportSettings(max_json_depth=limit))
            refused = ""
        except DoppelError as error:
            refused = str(error)
    assert (f"more than {limit} deep" in refused) == (depth(value) > limit), day
