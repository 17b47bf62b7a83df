"""The store's Alembic migrations: they build exactly the models on SQLite and PostgreSQL,
run once however many processes start together, and adopt databases made before them."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from slack_sdk.oauth.installation_store.sqlalchemy import SQLAlchemyInstallationStore
from slack_sdk.oauth.state_store.sqlalchemy import SQLAlchemyOAuthStateStore
from sqlalchemy import Connection, Engine, insert, inspect, select, text

from doppel.errors import DoppelError
from doppel.store.database import Database, make_engine
from doppel.store.models import Base, Enrollment, Workspace
from doppel.store.schema import (
    VERSION_TABLE,
    current_revision,
    head_revision,
    include_object,
    upgrade,
)
from tests.servers import free_port

POSTGRES = pytest.param("postgresql", marks=pytest.mark.postgres)
BOTH_DBS = pytest.mark.parametrize("db", ["sqlite", POSTGRES], indirect=True)
BOTH_UNMIGRATED = pytest.mark.parametrize("unmigrated", ["sqlite", POSTGRES], indirect=True)
HEAD = "0002"


def schema_diff(connection: Connection) -> list[Any]:
    """What `alembic check` reports: every way the database differs from the models."""
    context = MigrationContext.configure(
        connection,
        opts={
            "version_table": VERSION_TABLE,
            "include_object": include_object,
            "compare_server_default": True,
        },
    )
    return compare_metadata(context, Base.metadata)


@BOTH_DBS
def test_the_migrated_schema_is_exactly_the_models(db: Database) -> None:
    # slack-sdk's own tables share the database and stay out of the comparison.
    SQLAlchemyInstallationStore(client_id="x", engine=db.engine).create_tables()
    SQLAlchemyOAuthStateStore(expiration_seconds=600, engine=db.engine).create_tables()
    with db.engine.connect() as connection:
        assert schema_diff(connection) == []
        tables = set(inspect(connection).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert head_revision() == current_revision(db.engine) == HEAD


@BOTH_DBS
def test_upgrading_again_changes_nothing(db: Database) -> None:
    with db.transaction() as session:
        session.add(Workspace(id="T1", name="acme"))
    assert upgrade(db.engine) == (HEAD, HEAD)
    assert upgrade(db.engine) == (HEAD, HEAD)
    with db.session() as session:
        assert session.scalars(select(Workspace.name)).all() == ["acme"]


def _upgrade_together(url: str, start: Any, results: Any) -> None:
    """One of several processes that open the same fresh database at the same moment."""
    engine = make_engine(url, migrate=False)
    start.wait(timeout=120)
    results.put(upgrade(engine))
    engine.dispose()


@BOTH_UNMIGRATED
def test_concurrent_upgrades_of_a_fresh_database_run_one_at_a_time(unmigrated: Engine) -> None:
    url = unmigrated.url.render_as_string(hide_password=False)
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    workers = [spawn.Process(target=_upgrade_together, args=(url, start, results)) for _ in "ab"]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    assert [worker.exitcode for worker in workers] == [0, 0]
    outcomes = [results.get(timeout=10) for _ in workers]
    # One created the schema; the other waited for it and found it done.
    assert sorted(outcomes, key=str) == [(HEAD, HEAD), (None, HEAD)]
    with unmigrated.connect() as connection:
        assert schema_diff(connection) == []


@BOTH_UNMIGRATED
def test_a_database_from_before_migrations_is_stamped_and_keeps_its_rows(
    unmigrated: Engine,
) -> None:
    with unmigrated.begin() as connection:
        for table in Base.metadata.sorted_tables:  # what make_engine did before migrations
            table.create(connection)
        connection.execute(insert(Workspace).values(id="T1", name="acme"))
        connection.execute(
            insert(Enrollment).values(
                workspace_id="T1", user_id="U1", granted=True, changed_by="cli:ann"
            )
        )
    assert current_revision(unmigrated) is None
    assert upgrade(unmigrated) == (None, HEAD)
    assert current_revision(unmigrated) == HEAD
    with unmigrated.connect() as connection:
        assert schema_diff(connection) == []
        assert connection.execute(select(Workspace.id, Workspace.name)).all() == [("T1", "acme")]
        assert connection.execute(select(Enrollment.user_id)).scalars().all() == ["U1"]


@BOTH_UNMIGRATED
def test_unversioned_tables_unlike_the_models_are_refused_untouched(unmigrated: Engine) -> None:
    with unmigrated.begin() as connection:
        connection.execute(text("CREATE TABLE workspaces (id VARCHAR(32) PRIMARY KEY)"))
    with pytest.raises(DoppelError, match="no migration history") as refused:
        upgrade(unmigrated)
    assert "workspaces" in refused.value.message
    with unmigrated.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"workspaces"}


def test_an_unreachable_database_is_one_clear_error_without_its_password() -> None:
    url = f"postgresql+psycopg://doppel:s3cret@127.0.0.1:{free_port()}/store"
    with pytest.raises(DoppelError, match="cannot open the database") as refused:
        make_engine(url)
    assert "s3cret" not in str(refused.value) and "doppel:***@" in refused.value.message
    assert refused.value.hint == "check DATABASE_URL and that the server is running"


def doppel_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`doppel ARGS` as installed, in a subprocess with this test's DOPPEL_HOME."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "doppel"), *args],
        env=os.environ | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_doppel_db_upgrade_migrates_and_reports_the_revision(doppel_home: Path) -> None:
    first = doppel_cli("db", "upgrade", "--json")
    assert first.returncode == 0, first.stderr
    assert f"schema at revision {HEAD} (upgraded from none)" in first.stderr
    assert json.loads(first.stdout.splitlines()[-1]) == {"before": None, "after": HEAD}
    assert (doppel_home / "doppel.db").exists()

    again = doppel_cli("db", "upgrade")
    assert f"schema at revision {HEAD} (already up to date)" in again.stderr
    current = doppel_cli("db", "current", "--json")
    assert json.loads(current.stdout.splitlines()[-1]) == {"current": HEAD, "head": HEAD}
