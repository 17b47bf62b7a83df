"""`doppel users`: message and sample counts stay right, from the store's counts kept at
ingest, through every change that moves them; and the migration that added those counts
adopts a store made before migrations."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from alembic import command
from datasets import load_from_disk
from sqlalchemy import Engine, select, text

from doppel.config import Settings, get_settings, load_settings
from doppel.dataset.build import build_dataset, load_conversations, user_summaries
from doppel.dataset.counts import sample_counts, user_counts
from doppel.ingest import ingest_export
from doppel.store.database import Database
from doppel.store.models import Enrollment, Message, SampleCounts, Workspace, utcnow
from doppel.store.records import save_messages, save_users
from doppel.store.schema import alembic_config, current_revision, head_revision, upgrade
from tests.helpers import TEAM, doppel, last_json


def reference(settings: Settings, db: Database) -> tuple[dict[str, int], Counter[str]]:
    """Samples per person counted from scratch as a dataset build counts them, and
    messages per person counted in Python from every stored row."""
    with db.session() as session:
        workspace = session.get_one(Workspace, TEAM)
        loaded = load_conversations(session, workspace, settings.dataset.gap_minutes)
        authors = session.scalars(select(Message.user_id).where(Message.user_id.is_not(None)))
        messages = Counter(str(author) for author in authors)
    rows = user_summaries(loaded, {}, settings.dataset)
    return {row["id"]: row["samples"] for row in rows}, messages


def shown(settings: Settings) -> tuple[dict[str, int], dict[str, int]]:
    rows = user_counts(settings, TEAM)
    assert rows == sorted(rows, key=lambda r: (-r["samples"], -r["messages"], r["id"]))
    return {r["id"]: r["samples"] for r in rows}, {
        r["id"]: r["messages"] for r in rows if r["messages"]
    }


def stored_at(db: Database) -> object:
    with db.session() as session:
        return session.get_one(SampleCounts, TEAM).updated_at


def test_counts_are_right_and_follow_every_change(db: Database, synth_zip: Path) -> None:
    settings = get_settings()
    ingest_export(db, synth_zip, max_bytes=2**26)
    samples, messages = reference(settings, db)
    assert shown(settings) == (samples, dict(messages))
    top = max(samples, key=lambda uid: samples[uid])
    built = build_dataset(settings, top)  # the dataset a build really writes
    dataset = load_from_disk(str(built.path))
    assert dataset["train"].num_rows + dataset["validation"].num_rows == samples[top] > 0

    kept = stored_at(db)
    assert shown(settings)[0] == samples and stored_at(db) == kept  # read, not counted again

    # New messages: a long first answer in a thread `top` is not in: one more sample.
    with db.session() as session:
        stored = session.scalars(select(Message)).all()
    joined = {(m.channel_id, m.thread_ts) for m in stored if m.user_id == top}
    parent = next(
        m
        for m in stored
        if m.reply_count and m.user_id != top and (m.channel_id, m.ts) not in joined
    )
    answer = {"ts": f"{float(parent.ts) + 1:.6f}", "thread_ts": parent.ts, "user": top}
    answer["text"] = "A considered answer, " + "long enough to count as a sample. " * 4
    with db.transaction() as session:
        save_messages(session, TEAM, parent.channel_id, [answer])
    now, now_messages = reference(settings, db)
    assert now[top] == samples[top] + 1 and now_messages[top] == messages[top] + 1
    assert shown(settings) == (now, dict(now_messages))

    # A rename changes how mentions read, so it is a change too (counts recomputed).
    kept = stored_at(db)
    with db.transaction() as session:
        save_users(session, TEAM, [{"id": top, "name": "renamed", "profile": {}}])
    assert shown(settings)[0] == reference(settings, db)[0] and stored_at(db) != kept

    # An opt-out takes the person's messages out of everyone's samples.
    with db.transaction() as session:
        session.add(Enrollment(workspace_id=TEAM, user_id=top, granted=False, changed_by="t"))
    opted_out, _ = reference(settings, db)
    assert opted_out[top] == 0 and shown(settings)[0] == opted_out

    # Other dataset rules, other counts; settings that do not change a count keep them.
    lenient = load_settings(dataset={"min_chars": 20})
    assert shown(lenient)[0] == reference(lenient, db)[0] != opted_out
    kept = stored_at(db)
    unscrubbed = load_settings(dataset={"min_chars": 20, "scrub_emails": False})
    assert sample_counts(unscrubbed, TEAM) == shown(lenient)[0] and stored_at(db) == kept


def test_doppel_users_shows_the_counts(db: Database, synth_zip: Path) -> None:
    doppel("ingest", "export", str(synth_zip))  # counts the samples as it ingests
    with db.session() as session:
        assert session.get(SampleCounts, TEAM) is not None
    rows = last_json(doppel("users", "--json"))
    assert isinstance(rows, list)
    samples, messages = reference(get_settings(), db)
    assert {r["id"]: r["samples"] for r in rows} == samples
    assert {r["id"]: r["messages"] for r in rows if r["messages"]} == dict(messages)


@pytest.mark.parametrize(
    "unmigrated", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_a_store_from_before_migrations_is_adopted_at_its_revision(unmigrated: Engine) -> None:
    with unmigrated.begin() as connection:  # the tables as DoppelBot made them before Alembic
        command.upgrade(alembic_config(connection), "0001")
        connection.execute(text("DROP TABLE doppel_alembic_version"))
        connection.execute(
            text("INSERT INTO workspaces (id, name, updated_at) VALUES ('T1', 'a', :now)"),
            {"now": utcnow()},
        )
    assert current_revision(unmigrated) is None
    assert upgrade(unmigrated) == (None, head_revision())
    with unmigrated.connect() as connection:
        row = connection.execute(select(Workspace.id, Workspace.data_version)).one()
    assert tuple(row) == ("T1", 0)
