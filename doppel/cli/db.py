"""`doppel db`: the store's schema revision, and migrating it ahead of time.

Every command that opens the store migrates it first; `doppel db upgrade` does only that,
for a deploy step that should fail early, before the app and workers start.
"""

from __future__ import annotations

import typer

from doppel.cli.common import JsonFlag, app, emit
from doppel.config import get_settings
from doppel.progress import console

db_app = typer.Typer(no_args_is_help=True, help="The store's schema: Alembic migrations.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(as_json: JsonFlag = False) -> None:
    """Migrate the store (DATABASE_URL) to the newest schema revision."""
    from doppel.store.database import make_engine, reachable
    from doppel.store.schema import upgrade

    engine = make_engine(get_settings().db_url, migrate=False)
    try:
        with reachable(engine):
            before, after = upgrade(engine)
    finally:
        engine.dispose()
    state = "already up to date" if before == after else f"upgraded from {before or 'none'}"
    console.print(f"schema at revision {after} ({state})")
    emit({"before": before, "after": after}, as_json)


@db_app.command("current")
def db_current(as_json: JsonFlag = False) -> None:
    """Show the store's schema revision and the newest one this version ships."""
    from doppel.store.database import make_engine, reachable
    from doppel.store.schema import current_revision, head_revision

    engine = make_engine(get_settings().db_url, migrate=False)
    try:
        with reachable(engine):
            current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else "behind: run `doppel db upgrade`"
    console.print(f"schema at revision {current or 'none'}, newest {head} ({state})")
    emit({"current": current, "head": head}, as_json)
