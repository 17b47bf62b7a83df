"""Each person's message and sample counts, for `doppel users`, fast on big workspaces.

Messages are counted in SQL, one GROUP BY over the (workspace_id, user_id) index. Samples
cannot be: a count depends on conversations (threads, time gaps), merged turns, cleaned
markup, context and duplicates, which only `doppel.dataset.samples` decides. Counting
them means segmenting the whole workspace (30 s at 1M messages), so it is done after each
ingest (`refresh_sample_counts`) and stored with a fingerprint of everything a count
depends on: the workspace's `data_version` (raised by every write of its messages, users
or channels), the dataset rules that change a count, and who opted out. A stored count
whose fingerprint no longer matches is never shown; it is computed again first.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from doppel.config import DatasetSettings, Settings
from doppel.consent import opted_out_users
from doppel.store.database import database, upsert
from doppel.store.lookup import message_counts, people
from doppel.store.models import SampleCounts, Workspace, utcnow

# The `dataset:` settings a sample count depends on (scrubbing and the split do not).
COUNT_RULES = ("min_chars", "gap_minutes", "max_context_chars", "max_context_turns")


def fingerprint(session: Session, workspace_id: str, rules: DatasetSettings) -> str:
    """What the workspace's sample counts depend on, hashed: equal means still right."""
    basis = {
        "data_version": session.scalar(
            select(Workspace.data_version).where(Workspace.id == workspace_id)
        ),
        "rules": {name: getattr(rules, name) for name in COUNT_RULES},
        "opted_out": sorted(opted_out_users(session, workspace_id)),
    }
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def refresh_sample_counts(settings: Settings, workspace_id: str) -> dict[str, int]:
    """Count every person's samples as a dataset build would, and store the counts."""
    # The dataset step imports `datasets` (seconds): only a refresh pays for it.
    from doppel.dataset.build import load_conversations, user_summaries

    db = database(settings.db_url)
    with db.session() as session:
        workspace = session.get_one(Workspace, workspace_id)
        # Taken before the messages are read: a write meanwhile leaves these counts stale.
        stamp = fingerprint(session, workspace_id, settings.dataset)
        loaded = load_conversations(session, workspace, settings.dataset.gap_minutes)
    counts = {row["id"]: row["samples"] for row in user_summaries(loaded, {}, settings.dataset)}
    row = {
        "workspace_id": workspace_id,
        "fingerprint": stamp,
        "counts": counts,
        "updated_at": utcnow(),
    }
    with db.transaction() as session:
        upsert(session, SampleCounts, [row], ["fingerprint", "counts", "updated_at"])
    return counts


def sample_counts(settings: Settings, workspace_id: str) -> dict[str, int]:
    """Each person's sample count: the stored one while its fingerprint matches, else
    counted again (and stored)."""
    with database(settings.db_url).session() as session:
        stored = session.get(SampleCounts, workspace_id)
        if stored and stored.fingerprint == fingerprint(session, workspace_id, settings.dataset):
            return dict(stored.counts)
    return refresh_sample_counts(settings, workspace_id)


def user_counts(settings: Settings, workspace_id: str) -> list[dict[str, Any]]:
    """Every person of the workspace with their message count and how many samples a
    dataset build would yield, most samples first."""
    samples = sample_counts(settings, workspace_id)
    with database(settings.db_url).session() as session:
        known = people(session, workspace_id)
        messages = message_counts(session, workspace_id)
    rows = [
        {
            "id": person.id,
            "name": person.name,
            "display_name": person.display_name,
            "real_name": person.real_name,
            "is_bot": person.is_bot,
            "deleted": person.deleted,
            "messages": messages.get(person.id, 0),
            "samples": samples.get(person.id, 0),
        }
        for person in known.values()
    ]
    return sorted(rows, key=lambda row: (-row["samples"], -row["messages"], row["id"]))
