"""How fast do stored messages become conversations and samples?

Generates a synthetic workspace of about 1M messages, then times, on one core:
  1. segmenting every message into conversations (filtering, cleaning markup, turns);
  2. building the samples of the most active person;
  3. counting every person's samples (what each ingest does, so `doppel users` can read them).
With `--store`, it also ingests the workspace into SQLite and times reading it back.

    python benchmarks/samples.py [--users 200] [--days 580] [--store]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from devtools.synth import generate_workspace
from doppel.config import DatasetSettings
from doppel.dataset.clean import TextCleaner
from doppel.dataset.conversations import StoredMessage, segment
from doppel.dataset.samples import SampleRules, user_samples
from doppel.store.lookup import user_label


def timed(label: str, work, count: int):
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    print(f"{label:<44} {seconds:8.2f} s  {count / seconds:>12,.0f} workspace messages/s")
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--days", type=int, default=580)
    parser.add_argument("--store", action="store_true", help="also time SQLite ingest and read")
    args = parser.parse_args()

    start = time.perf_counter()
    workspace = generate_workspace(users=args.users, days=args.days, seed=0)
    rows = sorted(
        (
            StoredMessage(
                channel_id,
                m["ts"],
                m.get("thread_ts"),
                m.get("user"),
                m.get("subtype"),
                m.get("bot_id"),
                m.get("text", ""),
            )
            for channel_id, messages in workspace.messages.items()
            for m in messages
        ),
        key=lambda message: (message.channel_id, message.ts),
    )
    total = len(rows)
    print(f"generated {total:,} messages in {time.perf_counter() - start:.1f} s\n")

    names = {
        u["id"]: user_label(
            (u.get("profile") or {}).get("display_name"), u.get("real_name"), u.get("name"), u["id"]
        )
        for u in workspace.users
    }
    channels = {c["id"]: c["name"] for c in workspace.channels}
    bots = {u["id"] for u in workspace.users if u.get("is_bot")}
    settings = DatasetSettings()
    rules = SampleRules.from_settings(settings)

    segmented, seg_s = timed(
        "segment into conversations",
        lambda: segment(
            rows, bots=bots, clean=TextCleaner(names, channels), gap_minutes=settings.gap_minutes
        ),
        total,
    )
    by_author: dict[str, list] = {}
    for conversation in segmented.conversations:
        for author in {turn.author for turn in conversation.turns}:
            by_author.setdefault(author, []).append(conversation)
    top = max(by_author, key=lambda uid: len(by_author[uid]))
    built, top_s = timed(
        f"samples of the most active person ({top})",
        lambda: user_samples(by_author[top], top, rules),
        total,
    )
    timed(
        "samples of every person (at ingest)",
        lambda: [user_samples(convs, uid, rules) for uid, convs in by_author.items()],
        total,
    )
    print(
        f"\n{len(segmented.conversations):,} conversations, {len(built.samples):,} samples for "
        f"{top}; one user's dataset end to end: {total / (seg_s + top_s):,.0f} messages/s"
    )
    if args.store:
        store_benchmark(workspace, total)


def store_benchmark(workspace, total: int) -> None:
    from devtools.synth import write_export
    from doppel.dataset.build import load_conversations
    from doppel.ingest import ingest_export
    from doppel.store.database import Database
    from doppel.store.lookup import resolve_workspace

    with tempfile.TemporaryDirectory() as tmp:
        export = write_export(workspace, Path(tmp) / "bench.zip")
        db = Database(f"sqlite:///{tmp}/bench.db")
        timed(
            "ingest the export into SQLite",
            lambda: ingest_export(db, export, max_bytes=2**34),
            total,
        )
        with db.session() as session:
            ws = resolve_workspace(session, None)
            timed(
                "read back and segment from SQLite",
                lambda: load_conversations(session, ws, 30),
                total,
            )


if __name__ == "__main__":
    main()
