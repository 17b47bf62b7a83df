"""A throwaway PostgreSQL cluster for tests: initdb in a temporary folder, 127.0.0.1 only."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg


class PostgresCluster:
    """Starts Debian's PostgreSQL binaries as an unprivileged user when run as root."""

    def __init__(self) -> None:
        # Not under pytest's tmp: its root-only parents would lock the postgres user out.
        self.root = Path(tempfile.mkdtemp(prefix="doppel-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.user = "doppel"

    def start(self) -> str | None:
        """Start the cluster; return why not, if it cannot be started here."""
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        pg_bin = bindirs[-1] if bindirs else None
        if pg_bin is None and shutil.which("initdb"):
            pg_bin = str(Path(shutil.which("initdb")).parent)
        if pg_bin is None:
            return "no PostgreSQL server binaries (apt-get install -y postgresql)"
        run_as = self._run_as()
        self.root.chmod(0o777)
        initdb = [f"{pg_bin}/initdb", "-D", str(self.data), "-U", self.user, "--auth=trust"]
        commands = [
            [*initdb, "-E", "UTF8"],
            [
                f"{pg_bin}/pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                "-o", f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}", "start",
            ],
        ]  # fmt: skip
        self._pg_ctl = f"{pg_bin}/pg_ctl"
        for command in commands:
            done = subprocess.run(run_as + command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                return f"{Path(command[0]).name} failed: {done.stderr.strip()[-300:]}"
        return None

    def _run_as(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "postgres"], check=True)
        return ["runuser", "-u", "postgres", "--"]

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={database}"

    def stop(self) -> None:
        subprocess.run(
            [*self._run_as(), self._pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
