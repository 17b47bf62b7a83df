"""`doppel consent` and `doppel limits`: consent collected outside Slack, and each
workspace's limits."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from doppel.cli.common import JsonFlag, WorkspaceOption, app, emit
from doppel.config import get_settings
from doppel.errors import DoppelError
from doppel.progress import console
from doppel.store.database import database
from doppel.store.lookup import Person, find_person
from doppel.store.models import Workspace

consent_app = typer.Typer(
    no_args_is_help=True,
    help="Record consent collected outside Slack (the CLI side of /doppel optin and optout).",
)
app.add_typer(consent_app, name="consent")


def _operator() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


Users = Annotated[
    list[str], typer.Argument(help="User ids, names, display or real names (one or more).")
]


def _find_people(
    session: Session, users: list[str], workspace: str | None
) -> list[tuple[Workspace, Person]]:
    """Every person named, each resolved as `find_person` does, before anything changes:
    one unknown name fails them all. A person named twice counts once."""
    found = [find_person(session, user, workspace) for user in users]
    return list({person.id: (ws, person) for ws, person in found}.values())


@consent_app.command("grant")
def consent_grant(
    users: Users, workspace: WorkspaceOption = None, as_json: JsonFlag = False
) -> None:
    """Record that USERS agreed to be trained and impersonated."""
    from doppel.consent import grant

    results = []
    with database(get_settings().db_url).transaction() as session:
        for ws, person in _find_people(session, users, workspace):
            new = grant(session, ws.id, person.id, _operator())
            state = "now consents" if new else "had already consented"
            console.print(f"{person.label} ({person.id}) of {ws.id} {state}")
            results.append(
                {"workspace_id": ws.id, "user_id": person.id, "name": person.label, "new": new}
            )
    emit(results, as_json)


@consent_app.command("revoke")
def consent_revoke(
    users: Users, workspace: WorkspaceOption = None, as_json: JsonFlag = False
) -> None:
    """Withdraw USERS' consent, cancel their trainings and delete their datasets, adapters,
    MLflow runs and registry versions. Running it again finishes a deletion that failed."""
    from dataclasses import asdict
    from functools import partial

    from doppel.consent import revoke
    from serving.slack.training import cancel_trainings

    settings = get_settings()
    db = database(settings.db_url)
    with db.session() as session:
        found = _find_people(session, users, workspace)
    deletions = []
    for ws, person in found:
        stop_trainings = partial(cancel_trainings, settings, db, ws.id, person.id)
        deletion = revoke(settings, db, ws.id, person.id, _operator(), stop_trainings)
        console.print(f"{person.label} ({person.id}) of {ws.id} no longer consents. Deleted:")
        for line in deletion.lines():  # error texts may hold [brackets]: not markup
            console.print(f"  {line}", markup=False)
        deletions.append(deletion)
    emit([asdict(deletion) for deletion in deletions], as_json)
    unfinished = [d.user_id for d in deletions if not d.complete]
    if unfinished:
        raise DoppelError(
            f"consent is withdrawn, but not everything of {', '.join(unfinished)} could be "
            "deleted (the NOT deleted lines above say what and why)",
            "fix that, then run the same command again: it finishes the deletion",
        )


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
