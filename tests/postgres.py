"""A throwaway PostgreSQL cluster for tests: devtools' cluster in a temporary folder, on a
free port of 127.0.0.1, with a fresh database per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

from devtools.postgres import USER, Cluster
from doppel.errors import DoppelError
from tests.servers import free_port


class PostgresCluster:
    def __init__(self) -> None:
        # Not under pytest's tmp: its root-only parents would lock the postgres user out.
        self.root = Path(tempfile.mkdtemp(prefix="doppel-pg-"))
        self.port = free_port()
        self._cluster: Cluster | None = None

    def start(self) -> str | None:
        """Start the cluster; return why not, if it cannot be started here."""
        try:
            self._cluster = Cluster(self.root)
            self._cluster.start(self.port, self.root / "log")
        except DoppelError as error:
            return str(error)
        return None

    def new_database(self) -> str:
        """A fresh, empty database; returns its SQLAlchemy URL."""
        assert self._cluster is not None, "start the cluster first"
        name = "t_" + uuid.uuid4().hex[:12]
        self._cluster.create_databases(self.port, [name])
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self._cluster is not None:
            self._cluster.stop()
        shutil.rmtree(self.root, ignore_errors=True)
