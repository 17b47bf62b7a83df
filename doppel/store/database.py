"""Engines, sessions and dialect-aware upserts for SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, func, inspect, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from doppel.errors import DoppelError
from doppel.redact import redact
from doppel.store.models import Base, Channel, Message, User

UPSERT_CHUNK = 500


def make_engine(url: str, *, migrate: bool = True) -> Engine:
    """Create an engine and migrate the schema to the newest revision, unless `migrate` is
    off (`doppel db` reports revisions itself). SQLite gets WAL and a busy timeout for threads.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    else:
        engine = create_engine(url, pool_pre_ping=True)
    if migrate:
        from doppel.store.schema import upgrade  # Alembic: only once a store is opened

        with reachable(engine):
            upgrade(engine)
    return engine


@contextmanager
def reachable(engine: Engine) -> Iterator[None]:
    """Turn a database that cannot be reached into a DoppelError that says what to check."""
    try:
        yield
    except OperationalError as error:
        raise DoppelError(
            f"cannot open the database {engine.url.render_as_string(hide_password=True)}: "
            f"{redact(str(error.orig))}",
            "check DATABASE_URL and that the server is running",
        ) from None


class Database:
    """One engine plus a session factory; `transaction()` commits or rolls back as a unit."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def session(self) -> Session:
        return self._sessions()

    def dispose(self) -> None:
        self.engine.dispose()


@cache
def database(url: str) -> Database:
    """The process's one `Database` for a URL: its engine, pool and schema check are made once.

    Every caller that needs the store goes through here, `with database(url).session() as s:`,
    instead of opening and disposing an engine of its own.
    """
    return Database(url)


def upsert(
    session: Session,
    model: type[Base],
    rows: Iterable[dict[str, Any]],
    update: Iterable[str],
) -> None:
    """Insert rows, updating `update` columns where the primary key already exists."""
    rows = list(rows)
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    stmt: sqlite.Insert | postgresql.Insert
    if dialect == "sqlite":
        stmt = sqlite.insert(model)
    elif dialect == "postgresql":
        stmt = postgresql.insert(model)
    else:
        raise DoppelError(f"unsupported database '{dialect}'", "use SQLite or PostgreSQL")
    keys = [column.name for column in inspect(model).primary_key]
    upsert_stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={name: stmt.excluded[name] for name in update}
    )
    for start in range(0, len(rows), UPSERT_CHUNK):
        session.execute(upsert_stmt, rows[start : start + UPSERT_CHUNK])


def workspace_counts(session: Session, workspace_id: str) -> dict[str, int]:
    """Totals in the store: every message record, and threads with at least one reply."""

    def count(stmt: Any) -> int:
        return int(session.scalar(stmt) or 0)

    in_ws = Message.workspace_id == workspace_id
    return {
        "channels": count(
            select(func.count()).select_from(Channel).where(Channel.workspace_id == workspace_id)
        ),
        "users": count(
            select(func.count()).select_from(User).where(User.workspace_id == workspace_id)
        ),
        "messages": count(select(func.count()).select_from(Message).where(in_ws)),
        "threads": count(
            select(func.count(func.distinct(Message.channel_id + ":" + Message.thread_ts))).where(
                in_ws, Message.thread_ts.is_not(None), Message.thread_ts != Message.ts
            )
        ),
    }
