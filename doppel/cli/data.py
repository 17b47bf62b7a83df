"""`doppel users` and `doppel dataset`: who is in the store, and their chat datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from doppel.cli.common import JsonFlag, WorkspaceOption, app, emit
from doppel.config import get_settings
from doppel.progress import console
from doppel.store.database import database

dataset_app = typer.Typer(no_args_is_help=True, help="Turn a user's conversations into samples.")
app.add_typer(dataset_app, name="dataset")


@app.command()
def users(workspace: WorkspaceOption = None, as_json: JsonFlag = False) -> None:
    """List users with their message counts and how many samples each would yield."""
    from doppel.dataset.counts import user_counts
    from doppel.store.lookup import resolve_workspace

    settings = get_settings()
    with database(settings.db_url).session() as session:
        workspace_id = resolve_workspace(session, workspace).id
    rows = user_counts(settings, workspace_id)
    table = Table("id", "name", "display name", "real name", "messages", "samples")
    for row in rows:
        flags = " (bot)" if row["is_bot"] else " (deleted)" if row["deleted"] else ""
        table.add_row(
            row["id"],
            (row["name"] or "") + flags,
            row["display_name"] or "",
            row["real_name"] or "",
            str(row["messages"]),
            str(row["samples"]),
        )
    console.print(table)
    emit(rows, as_json)


@dataset_app.command("build")
def dataset_build(
    user: Annotated[str, typer.Option("--user", help="User id, name, display or real name.")],
    workspace: WorkspaceOption = None,
    min_chars: Annotated[int | None, typer.Option(help="Shortest reply kept.")] = None,
    gap_minutes: Annotated[
        float | None, typer.Option(help="A quieter gap than this starts a new conversation.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Build a user's chat dataset (train/validation `DatasetDict` plus stats.json)."""
    from doppel.dataset.build import build_dataset

    with console.status("building samples"):
        built = build_dataset(
            get_settings(),
            user,
            workspace=workspace,
            min_chars=min_chars,
            gap_minutes=gap_minutes,
            out=out,
        )
    console.print(
        f"dataset for {built.user_name} ({built.user_id}): {built.train} train, "
        f"{built.validation} validation samples -> {built.path}"
    )
    emit(
        {
            "path": str(built.path),
            "user_id": built.user_id,
            "train": built.train,
            "validation": built.validation,
            "stats": built.stats,
        },
        as_json,
    )
