"""A PostgreSQL cluster on this machine, for `scripts/stack.sh`: Debian's server binaries,
one folder, 127.0.0.1 only, no Unix socket (its path could outgrow the kernel's limit).

As root, the server runs as the unprivileged `postgres` user (PostgreSQL refuses root), so
the folder is handed to that user; its parents must let that user through.

    python -m devtools.postgres start --root DIR --port P --log FILE [--database NAME ...]
    python -m devtools.postgres stop|status --root DIR
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg

from doppel.errors import DoppelError

USER = "doppel"  # the cluster's superuser; trust authentication, 127.0.0.1 only
SERVICE_USER = "postgres"  # who runs the server when we are root


def server_bin() -> Path:
    """The folder of `initdb` and `pg_ctl`: Debian's newest, else whatever is on PATH."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version)
    if folders:
        return Path(folders[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise DoppelError(
        "no PostgreSQL server binaries (initdb, pg_ctl) here",
        "apt-get install -y postgresql (about 10 s), or put initdb on PATH",
    )


def _version(folder: str) -> int:
    name = Path(folder).parent.name
    return int(name) if name.isdigit() else 0


def run_as() -> list[str]:
    """The prefix that runs a command as the server's user: nothing unless we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", SERVICE_USER], check=True)
    return ["runuser", "-u", SERVICE_USER, "--"]


class Cluster:
    """The cluster whose data lives in `root/data`."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.data = self.root / "data"
        self.pg_ctl = str(server_bin() / "pg_ctl")

    def _run(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*run_as(), *command], capture_output=True, text=True, timeout=timeout, check=False
        )

    def running(self) -> bool:
        return self._run(self.pg_ctl, "-D", str(self.data), "status").returncode == 0

    def start(self, port: int, log: Path) -> None:
        """initdb once, then start the server unless it runs; returns once it accepts."""
        self._hand_over(log)
        if not (self.data / "PG_VERSION").is_file():
            initdb = str(server_bin() / "initdb")
            done = self._run(initdb, "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8")
            if done.returncode != 0:
                raise DoppelError(f"initdb failed: {done.stderr.strip()[-500:]}", f"see {log}")
        if self.running():
            return
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        done = self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(log), "-w", "-t", "60", "-o", options,
            "start",
        )  # fmt: skip
        if done.returncode != 0:
            raise DoppelError(
                f"PostgreSQL did not start on 127.0.0.1:{port}: {done.stdout.strip()[-300:]}",
                f"see {log} (is the port taken? set DOPPEL_STACK_POSTGRES_PORT)",
            )

    def _hand_over(self, log: Path) -> None:
        """The folder and the log to the server's user, who must be able to reach them."""
        self.root.mkdir(parents=True, exist_ok=True)
        log.touch()
        prefix = run_as()
        if not prefix:
            return
        for path in (self.root, log):
            shutil.chown(path, SERVICE_USER, SERVICE_USER)
        if subprocess.run([*prefix, "test", "-w", str(self.root)], check=False).returncode:
            raise DoppelError(
                f"the {SERVICE_USER} user cannot reach {self.root}",
                "let others through its parent folders (chmod o+x) or put the stack elsewhere "
                "(DOPPEL_STACK_DIR)",
            )

    def create_databases(self, port: int, names: list[str]) -> None:
        """Create the databases that do not exist yet."""
        dsn = f"host=127.0.0.1 port={port} user={USER} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            rows = connection.execute("SELECT datname FROM pg_database").fetchall()
            existing = {row[0] for row in rows}
            for name in names:
                if name not in existing:
                    connection.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        """Stop the server if it runs (in-flight transactions are rolled back)."""
        if (self.data / "PG_VERSION").is_file() and self.running():
            done = self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")
            if done.returncode != 0:
                raise DoppelError(f"pg_ctl stop failed: {done.stderr.strip()[-300:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="initdb once, start, create the databases")
    start.add_argument("--root", type=Path, required=True)
    start.add_argument("--port", type=int, required=True)
    start.add_argument("--log", type=Path, required=True)
    start.add_argument("--database", action="append", default=[])
    for name, what in (("stop", "stop the server if it runs"), ("status", "exit 3 if stopped")):
        commands.add_parser(name, help=what).add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        cluster = Cluster(args.root)
        if args.command == "start":
            cluster.start(args.port, args.log.resolve())
            cluster.create_databases(args.port, args.database)
        elif args.command == "stop":
            cluster.stop()
        elif not cluster.running():
            return 3
    except DoppelError as error:
        hint = f"\nhint: {error.hint}" if error.hint else ""
        print(f"error: {error.message}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
