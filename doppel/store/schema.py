"""The store's schema under Alembic: every process migrates to the newest revision on start.

The migrations ship inside the package (`doppel/store/migrations`) and are configured here,
not by an alembic.ini, so they run the same from a checkout and from an installed wheel.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, func, inspect, select

from doppel.errors import DoppelError
from doppel.store.models import Base

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Our own name: DATABASE_URL may be a PostgreSQL database that MLflow (itself on Alembic,
# with the default `alembic_version`) shares.
VERSION_TABLE = "doppel_alembic_version"
# slack-sdk creates and owns its OAuth tables on the same database (serving/slack/installations).
SLACK_SDK_TABLES = frozenset({"slack_installations", "slack_bots", "slack_oauth_states"})
# What DoppelBot's engine created straight from the models before it had migrations.
PRE_MIGRATION_REVISION = "0001"
# Serializes upgrades across processes on one PostgreSQL database ("doppel" in ASCII).
PG_LOCK_ID = 0x646F7070656C


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Leave slack-sdk's tables (and their indexes) out of autogenerate and schema checks."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return getattr(table, "name", None) not in SLACK_SDK_TABLES


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built in code; env.py migrates `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str | None:
    """The newest revision the package ships."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; None when it has never been migrated."""
    with engine.connect() as connection:
        return _revision(connection)


def upgrade(engine: Engine) -> tuple[str | None, str | None]:
    """Migrate the database to the newest revision; returns its revision before and after.

    Safe when several processes start at once (see `_exclusive`). A database whose tables
    DoppelBot created straight from the models, before it had migrations, is stamped with
    the revision its tables match, then upgraded from there.
    """
    with _exclusive(engine) as connection:
        before = _revision(connection)
        config = alembic_config(connection)
        stamp = _pre_migration_revision(connection) if before is None else None
        if stamp is not None:
            command.stamp(config, stamp)
        command.upgrade(config, "head")
        return before, _revision(connection)


def _revision(connection: Connection) -> str | None:
    opts = {"version_table": VERSION_TABLE}
    return MigrationContext.configure(connection, opts=opts).get_current_revision()


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other process's upgrade runs beside.

    PostgreSQL: a transaction-level advisory lock; DDL is transactional there, so a second
    process waits, then reads the version the first one committed. SQLite: an exclusive
    flock on `<db file>.migrate.lock`, which waits as long as a migration takes (SQLite's
    busy timeout would give up), around a `BEGIN IMMEDIATE` that makes the upgrade atomic.
    """
    if engine.dialect.name == "postgresql":
        with engine.begin() as connection:
            connection.execute(select(func.pg_advisory_xact_lock(PG_LOCK_ID)))
            yield connection
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        with engine.begin() as connection:
            yield connection
        return
    with open(f"{database}.migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with engine.begin() as connection:
            # pysqlite runs DDL outside any transaction unless one is begun explicitly.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield connection


def _pre_migration_revision(connection: Connection) -> str | None:
    """The revision a database with our tables but no migration history is at: "head" when
    its tables are exactly today's models, PRE_MIGRATION_REVISION when they are exactly
    what DoppelBot created from its models before it had migrations; None without our
    tables. Anything else is refused untouched."""
    ours = set(inspect(connection).get_table_names()) & set(Base.metadata.tables)
    if not ours:
        return None
    differences = _differences(connection)
    if not differences:
        return "head"
    if _shapes(differences) == _shapes(_differences_at(PRE_MIGRATION_REVISION)):
        return PRE_MIGRATION_REVISION
    shown = "; ".join(str(change)[:160] for change in differences[:3])
    raise DoppelError(
        f"the database has DoppelBot tables ({', '.join(sorted(ours))}) but no migration "
        f"history, and they differ from the models in {len(differences)} ways: {shown}",
        "point DATABASE_URL at a new database, or bring these tables to the models' "
        "schema by hand; `doppel db upgrade` then records the revision",
    )


def _differences(connection: Connection) -> list[Any]:
    """How the database's tables differ from today's models (other tables left out)."""

    def ours_only(obj: Any, name: str | None, type_: str, reflected: bool, to: Any) -> bool:
        is_foreign_table = type_ == "table" and reflected and to is None
        return not is_foreign_table and include_object(obj, name, type_, reflected, to)

    context = MigrationContext.configure(
        connection,
        opts={
            "version_table": VERSION_TABLE,
            "include_object": ours_only,
            "compare_server_default": True,
        },
    )
    return list(compare_metadata(context, Base.metadata))


def _differences_at(revision: str) -> list[Any]:
    """How a database migrated to `revision` differs from today's models, found by
    migrating a scratch in-memory SQLite database."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.begin() as connection:
            command.upgrade(alembic_config(connection), revision)
            return _differences(connection)
    finally:
        scratch.dispose()


def _shapes(differences: list[Any]) -> set[tuple]:
    """Differences by what they change (operation, table, column or index), leaving out
    dialect details, so that a PostgreSQL database compares with the SQLite scratch."""

    def shape(change: Any) -> tuple:
        if isinstance(change, list):  # modify_* changes of one column come grouped
            return tuple(shape(part) for part in change)
        operation, *args = change
        return (operation, *(getattr(arg, "name", arg) for arg in args[:3]))

    return {shape(change) for change in differences}
