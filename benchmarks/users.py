"""How long does `doppel users` take on a workspace of about 1M messages?

Builds a SQLite store of a synthetic workspace (200 people, 580 days: 998,080 messages)
with a bulk insert, then times `doppel users` as a user runs it, in a subprocess. The
bulk insert stores no sample counts, so the first run counts them and stores them (what
every ingest now does when it ends); the runs after it read them.

    python benchmarks/users.py [--users 200] [--days 580] [--db PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.synth import generate_workspace
from doppel.store.database import database
from doppel.store.models import Channel, Message, User
from doppel.store.records import channel_row, message_row, save_workspace, user_row

REPO = Path(__file__).resolve().parent.parent
CHUNK = 50_000


def build_store(url: str, users: int, days: int) -> tuple[str, int]:
    """A store holding one synthetic workspace, written with executemany in one
    transaction; returns its workspace id and message count."""
    workspace = generate_workspace(users=users, days=days, seed=0)
    db = database(url)
    with db.transaction() as session:
        save_workspace(session, workspace.workspace_id, workspace.team_name)
    tables = [
        (User, [user_row(workspace.workspace_id, user) for user in workspace.users]),
        (Channel, [channel_row(workspace.workspace_id, room) for room in workspace.channels]),
        (
            Message,
            [
                message_row(workspace.workspace_id, channel_id, message)
                for channel_id, messages in workspace.messages.items()
                for message in messages
            ],
        ),
    ]
    with db.engine.begin() as connection:
        for model, rows in tables:
            columns = list(rows[0])
            sql = (
                f"INSERT INTO {model.__tablename__} ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)})"
            )
            for start in range(0, len(rows), CHUNK):
                chunk = [tuple(row[c] for c in columns) for row in rows[start : start + CHUNK]]
                connection.exec_driver_sql(sql, chunk)
    return workspace.workspace_id, len(tables[2][1])


def doppel_users(env: dict[str, str], workspace_id: str) -> tuple[float, list[dict]]:
    """`doppel users --json` in a subprocess: its wall time and its rows."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "doppel.cli", "users", "--workspace", workspace_id, "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--days", type=int, default=580)
    parser.add_argument("--db", type=Path, help="keep the store here (default: a temp dir)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = (args.db or Path(tmp) / "users.db").resolve()
        url = f"sqlite:///{path}"
        start = time.perf_counter()
        workspace_id, total = build_store(url, args.users, args.days)
        print(f"built a store of {total:,} messages in {time.perf_counter() - start:.1f} s")
        env = os.environ | {"DOPPEL_HOME": tmp, "DATABASE_URL": url}
        first: list[dict] | None = None
        for run in range(1, args.runs + 1):
            seconds, rows = doppel_users(env, workspace_id)
            first = first or rows
            assert rows == first, "every run shows the same counts"
            top = rows[0]
            what = "counts and stores the samples" if run == 1 else "reads the stored counts"
            print(
                f"run {run}: doppel users {seconds:6.2f} s, {what} ({len(rows)} people; top "
                f"{top['id']}: {top['messages']:,} messages, {top['samples']:,} samples)"
            )


if __name__ == "__main__":
    main()
