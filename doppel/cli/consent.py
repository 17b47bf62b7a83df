"""`doppel consent` and `doppel limits`: consent collected outside Slack, and each
workspace's limits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from doppel.cli.common import JsonFlag, WorkspaceOption, app, emit
from doppel.config import get_settings
from doppel.progress import console
from doppel.store.database import database

consent_app = typer.Typer(
    no_args_is_help=True,
    help="Record consent collected outside Slack (the CLI side of /doppel optin and optout).",
)
app.add_typer(consent_app, name="consent")


def _operator() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@consent_app.command("grant")
def consent_grant(
    user: Annotated[str, typer.Argument(help="User id, name, display or real name.")],
    workspace: WorkspaceOption = None,
) -> None:
    """Record that USER agreed to be trained and impersonated."""
    from doppel.consent import grant
    from doppel.store.lookup import find_person

    with database(get_settings().db_url).transaction() as session:
        ws, person = find_person(session, user, workspace)
        new = grant(session, ws.id, person.id, _operator())
    state = "now consents" if new else "had already consented"
    console.print(f"{person.label} ({person.id}) of {ws.id} {state}")


@consent_app.command("revoke")
def consent_revoke(
    user: Annotated[str, typer.Argument(help="User id, name, display or real name.")],
    workspace: WorkspaceOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Withdraw USER's consent and delete their datasets, adapters and registry versions."""
    from dataclasses import asdict

    from doppel.consent import revoke
    from doppel.store.lookup import find_person

    settings = get_settings()
    db = database(settings.db_url)
    with db.session() as session:
        ws, person = find_person(session, user, workspace)
    deletion = revoke(settings, db, ws.id, person.id, _operator())
    console.print(f"{person.label} ({person.id}) of {ws.id} no longer consents. Deleted:")
    for line in deletion.lines():
        console.print(f"  {line}")
    emit(asdict(deletion), as_json)


@consent_app.command("list")
def consent_list(workspace: WorkspaceOption = None, as_json: JsonFlag = False) -> None:
    """Everyone whose consent is recorded, with who recorded it and when."""
    from sqlalchemy import select

    from doppel.store.lookup import people, resolve_workspace
    from doppel.store.models import Enrollment

    with database(get_settings().db_url).session() as session:
        ws = resolve_workspace(session, workspace)
        known = people(session, ws.id)
        rows = session.scalars(
            select(Enrollment).where(Enrollment.workspace_id == ws.id).order_by(Enrollment.user_id)
        ).all()
    table = Table("id", "name", "consent", "by", "at")
    result = []
    for row in rows:
        person = known.get(row.user_id)
        label = person.label if person else ""
        table.add_row(
            row.user_id,
            label,
            "granted" if row.granted else "revoked",
            row.changed_by,
            f"{row.changed_at:%Y-%m-%d %H:%M}",
        )
        result.append({"user_id": row.user_id, "name": label, "granted": row.granted})
    console.print(table)
    emit(result, as_json)


@app.command()
def limits(
    workspace: Annotated[str, typer.Option("--workspace", help="Workspace id (workspace_id).")],
    max_enrolled: Annotated[int | None, typer.Option(min=0, help="People who may opt in.")] = None,
    trainings_per_day: Annotated[
        int | None, typer.Option(min=0, help="/doppel train requests per 24 hours.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show, or set, a workspace's limits (defaults: the slack_app settings)."""
    from dataclasses import asdict

    from serving.slack.state import limits as current_limits
    from serving.slack.state import set_limits

    settings = get_settings()
    with database(settings.db_url).transaction() as session:
        set_limits(session, workspace, max_enrolled, trainings_per_day)
        now = current_limits(session, workspace, settings.slack_app)
    console.print(
        f"{workspace}: at most {now.max_enrolled} people enrolled, "
        f"{now.trainings_per_day} trainings per 24 hours"
    )
    emit(asdict(now), as_json)
