"""`python -m devtools.postgres`, which `scripts/stack.sh` runs: a cluster started twice is
started once, its databases made once, and a stopped one says so."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from devtools.postgres import USER, server_bin
from doppel.errors import DoppelError
from tests.helpers import REPO, skip_or_fail
from tests.servers import free_port


@pytest.fixture
def root() -> Iterator[Path]:
    try:
        server_bin()
    except DoppelError as error:
        skip_or_fail(f"PostgreSQL tests skipped: {error.message}")
    # Under /tmp, not pytest's tmp: the postgres user must reach it.
    folder = Path(tempfile.mkdtemp(prefix="doppel-pg-cli-"))
    folder.chmod(0o755)
    yield folder / "postgres"
    postgres(["stop", "--root", str(folder / "postgres")])
    shutil.rmtree(folder, ignore_errors=True)


def postgres(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtools.postgres", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_start_is_idempotent_and_stop_stops(root: Path) -> None:
    port, log = free_port(), str(root.parent / "pg.log")
    start = ["start", "--root", str(root), "--port", str(port), "--log", log]
    first = postgres([*start, "--database", "doppel", "--database", "mlflow"])
    assert first.returncode == 0, first.stderr
    again = postgres([*start, "--database", "doppel", "--database", "prefect"])
    assert again.returncode == 0, again.stderr
    dsn = f"host=127.0.0.1 port={port} user={USER} dbname=postgres"
    with psycopg.connect(dsn) as connection:
        names = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
    assert {"doppel", "mlflow", "prefect"} <= names
    assert postgres(["status", "--root", str(root)]).returncode == 0

    assert postgres(["stop", "--root", str(root)]).returncode == 0
    assert postgres(["status", "--root", str(root)]).returncode == 3
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)


def test_a_taken_port_is_named(root: Path) -> None:
    log = str(root.parent / "pg.log")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = postgres(["start", "--root", str(root), "--port", str(port), "--log", log])
    assert taken.returncode == 1
    assert f"127.0.0.1:{port}" in taken.stderr and "DOPPEL_STACK_POSTGRES_PORT" in taken.stderr
