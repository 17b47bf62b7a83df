"""What several test modules share: paths, the CLI in a subprocess, store snapshots, export
folders, and the rule that CI never skips what it always has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from doppel.store.database import Database
from doppel.store.models import Base

REPO = Path(__file__).resolve().parent.parent
SHARED_EXPORT = REPO.parent / "shared" / "data" / "slack-exports" / "houstondatavis-2016.zip"

# The synthetic workspace of the `synth_zip` fixture, and its "honestly, ... :rocket:" persona.
TEAM, USER = "T0SYNTH01", "U0000001"
# A recipe small enough for a test to train in seconds on 2 cores.
TINY = {"max_length": 128, "batch_size": 4, "eval_steps": 4, "learning_rate": 2e-3}


def skip_or_fail(reason: str) -> None:
    """Skip here, but fail under CI=true: CI always has PostgreSQL, vLLM and ../shared, so a
    skip there would hide a broken install rather than a missing one."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must run this test)", pytrace=False)
    pytest.skip(reason)


def require_shared_export() -> Path:
    """The real export in ../shared, beside the checkout."""
    if not SHARED_EXPORT.exists():
        skip_or_fail(f"{SHARED_EXPORT} is absent (a clone without ../shared)")
    return SHARED_EXPORT


def doppel(
    *args: str, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `doppel ARGS` as a user would, in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "doppel.cli", *args],
        cwd=REPO,
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def last_json(result: subprocess.CompletedProcess[str]) -> object:
    """The JSON object a command prints as its last line with --json."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def store_snapshot(db: Database, *, scrape_state: bool = True) -> dict[str, list]:
    """Every stored row, sorted, minus timestamps of our own; optionally minus scrape state."""
    skip = {"updated_at"} if scrape_state else {"updated_at", "replies_synced_ts"}
    tables = [t for t in Base.metadata.sorted_tables if t.name != "workspaces"]
    if not scrape_state:
        tables = [t for t in tables if t.name != "scrape_cursors"]
    with db.session() as session:
        return {
            table.name: sorted(
                tuple(row)
                for row in session.execute(select(*[c for c in table.c if c.name not in skip]))
            )
            for table in tables
        }


def write_export_folder(
    root: Path, days: dict[str, dict[str, list]], **index_files: object
) -> Path:
    """Write an export folder: index files (channels.json, ...) and channel/day.json files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in index_files.items():
        (root / f"{name}.json").write_text(json.dumps(content))
    for folder, files in days.items():
        (root / folder).mkdir(exist_ok=True)
        for day, messages in files.items():
            (root / folder / f"{day}.json").write_text(json.dumps(messages))
    return root


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return out
