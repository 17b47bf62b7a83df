"""`doppel ingest`: bring Slack messages into the store, from an export or the Web API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from doppel.cli.common import JsonFlag, app, emit, prefect_env
from doppel.config import get_settings
from doppel.errors import DoppelError
from doppel.progress import console
from doppel.store.database import database

ingest_app = typer.Typer(no_args_is_help=True, help="Bring Slack messages into the store.")
app.add_typer(ingest_app, name="ingest")


@ingest_app.command("export")
def ingest_export(
    path: Annotated[Path, typer.Argument(help="Slack export .zip or unzipped folder.")],
    workspace: Annotated[
        str | None, typer.Option(help="Workspace id (workspace_id) when the export lacks one.")
    ] = None,
    include_private: Annotated[
        bool, typer.Option(help="Also read groups.json, dms.json and mpims.json.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Import a Slack export in one transaction (re-importing changes nothing)."""
    from doppel.dataset.counts import refresh_sample_counts
    from doppel.ingest import ingest_export as run

    settings = get_settings()
    db = database(settings.db_url)
    with console.status(f"reading {path}"):
        result = run(
            db,
            path,
            workspace=workspace,
            include_private=include_private,
            max_bytes=settings.export.max_unzipped_mb * 2**20,
            limits=settings.export,
        )
    with console.status("counting samples for 'doppel users'"):
        refresh_sample_counts(settings, str(result["workspace"]))
    console.print(
        f"workspace {result['workspace']}: {result['channels']} channels, {result['users']} "
        f"users, {result['messages']} messages, {result['threads']} threads"
    )
    emit(result, as_json)


@ingest_app.command("slack")
def ingest_slack(
    workspace: Annotated[
        str | None,
        typer.Option(
            help="Workspace id (T...): read with its installation's token, or with "
            "SLACK_BOT_TOKEN when it is that workspace's. Default: SLACK_BOT_TOKEN's "
            "workspace, or the only one the app is installed in."
        ),
    ] = None,
    channel: Annotated[
        list[str] | None, typer.Option("--channel", help="Only these channels (name or id).")
    ] = None,
    include_archived: Annotated[bool | None, typer.Option(help="Also archived channels.")] = None,
    include_private: Annotated[
        bool | None, typer.Option(help="Also private channels, DMs and group DMs.")
    ] = None,
    join: Annotated[bool | None, typer.Option(help="Join public channels first.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Scrape through the Slack Web API: incremental, resumable and rate-limited."""
    from doppel.slack.tokens import require_token

    settings = get_settings()
    require_token(settings, database(settings.db_url).engine, workspace)  # before Prefect starts
    prefect_env(settings)
    from flows.ingest import ingest_flow

    result = ingest_flow(
        workspace=workspace,
        channels=channel or None,
        include_archived=include_archived,
        include_private=include_private,
        join=join,
    )
    console.print(
        f"workspace {result['workspace']}: {result['channels']} channels, {result['users']} "
        f"users, {result['messages']} messages, {result['threads']} threads "
        f"({result['fetched']} fetched this run)"
    )
    for name, reason in {**result["skipped"], **result["failed"]}.items():
        console.print(f"[yellow]skipped #{name}:[/] {reason}")
    summary = {key: result[key] for key in ("workspace", "channels", "users", "messages")}
    emit({**summary, "threads": result["threads"], "skipped": result["skipped"]}, as_json)
    if result["failed"]:
        raise DoppelError(
            f"{len(result['failed'])} channel(s) failed after retries",
            "run the same command again: it resumes where it stopped",
        )
