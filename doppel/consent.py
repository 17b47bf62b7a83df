"""Consent: only people who opted in are trained or impersonated.

Opting out deletes what DoppelBot made of a person: their datasets, their training run
folders, and their registered model with every version and the MLflow runs (adapters)
behind it. Their messages stay in the store, which mirrors Slack and would get them back
at the next ingest, but the revoked consent keeps them out of every dataset from then
on: their own and, as context, everyone else's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.store.database import Database, database, upsert
from doppel.store.models import ActivePersona, Enrollment, Message, utcnow

ENROLLMENT_FIELDS = ("granted", "changed_by", "changed_at")


def consented_users(session: Session, workspace_id: str) -> list[str]:
    """Everyone in the workspace who opted in, by user id."""
    return list(
        session.scalars(
            select(Enrollment.user_id)
            .where(Enrollment.workspace_id == workspace_id, Enrollment.granted.is_(True))
            .order_by(Enrollment.user_id)
        )
    )


def opted_out_users(session: Session, workspace_id: str) -> set[str]:
    """Everyone who revoked consent: their messages are left out of datasets."""
    return set(
        session.scalars(
            select(Enrollment.user_id).where(
                Enrollment.workspace_id == workspace_id, Enrollment.granted.is_(False)
            )
        )
    )


def has_consent(session: Session, workspace_id: str, user_id: str) -> bool:
    row = session.get(Enrollment, (workspace_id, user_id))
    return bool(row and row.granted)


def require_consent(settings: Settings, workspace_id: str, user_id: str) -> None:
    """Refuse to train someone who has not opted in."""
    with database(settings.db_url).session() as session:
        allowed = has_consent(session, workspace_id, user_id)
    if not allowed:
        raise DoppelError(
            f"user {user_id} of workspace {workspace_id} has not consented to be trained",
            "they can run '/doppel optin' in Slack, or an operator who collected consent "
            f"elsewhere can run 'doppel consent grant {user_id} --workspace {workspace_id}'",
        )


def grant(
    session: Session, workspace_id: str, user_id: str, by: str, max_enrolled: int | None = None
) -> bool:
    """Record consent; False when it was already given. `max_enrolled` caps the workspace."""
    if has_consent(session, workspace_id, user_id):
        return False
    if max_enrolled is not None and len(consented_users(session, workspace_id)) >= max_enrolled:
        raise DoppelError(
            f"workspace {workspace_id} already has its limit of {max_enrolled} enrolled people",
            "an operator can raise it: doppel limits --max-enrolled N",
        )
    row = {"workspace_id": workspace_id, "user_id": user_id}
    upsert(
        session,
        Enrollment,
        [{**row, "granted": True, "changed_by": by, "changed_at": utcnow()}],
        ENROLLMENT_FIELDS,
    )
    return True


@dataclass
class Deletion:
    """What opting out removed, so it can be confirmed to the person."""

    workspace_id: str
    user_id: str
    datasets: list[str] = field(default_factory=list)
    run_folders: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # Registry.delete_model's answer
    personas_cleared: list[str] = field(default_factory=list)  # channel ids, "*" = workspace
    messages_excluded: int = 0

    def lines(self) -> list[str]:
        versions = self.model.get("versions") or []
        runs = self.model.get("runs") or []
        return [
            f"datasets deleted: {len(self.datasets)}",
            f"training run folders deleted: {len(self.run_folders)}",
            f"registry versions deleted: {', '.join(versions) or 'none'}"
            + (f" (model {self.model['name']})" if versions else ""),
            f"adapters deleted (MLflow runs and their artifacts): {len(runs)}",
            f"active persona cleared in: {', '.join(self.personas_cleared) or 'nowhere'}",
            f"stored messages now left out of every dataset: {self.messages_excluded}",
        ]


def revoke(settings: Settings, db: Database, workspace_id: str, user_id: str, by: str) -> Deletion:
    """Withdraw consent, then delete the person's datasets, runs, adapters and versions.

    Consent is withdrawn first and on its own, so it holds even if a deletion below
    fails; running `revoke` again finishes the job.
    """
    from doppel.registry import Registry, model_name  # MLflow is slow to import

    deletion = Deletion(workspace_id, user_id)
    with db.transaction() as session:
        row = {"workspace_id": workspace_id, "user_id": user_id}
        upsert(
            session,
            Enrollment,
            [{**row, "granted": False, "changed_by": by, "changed_at": utcnow()}],
            ENROLLMENT_FIELDS,
        )
        scopes = select(ActivePersona.channel_id).where(
            ActivePersona.workspace_id == workspace_id, ActivePersona.user_id == user_id
        )
        deletion.personas_cleared = sorted(session.scalars(scopes))
        session.execute(
            delete(ActivePersona).where(
                ActivePersona.workspace_id == workspace_id, ActivePersona.user_id == user_id
            )
        )
        deletion.messages_excluded = int(
            session.scalar(
                select(func.count())
                .select_from(Message)
                .where(Message.workspace_id == workspace_id, Message.user_id == user_id)
            )
            or 0
        )
    dataset = settings.dataset_dir(workspace_id, user_id)
    deletion.datasets = _remove(dataset, dataset.with_name(f".{dataset.name}.previous"))
    runs = settings.run_dir(workspace_id, user_id)
    deletion.run_folders = [str(p) for p in sorted(runs.iterdir())] if runs.is_dir() else []
    _remove(runs)
    try:
        deletion.model = Registry(settings).delete_model(model_name(workspace_id, user_id))
    except DoppelError as error:
        raise DoppelError(
            f"consent is withdrawn, but the adapters were not deleted: {error.message}",
            "fix that, then opt out again: it finishes the deletion",
        ) from None
    return deletion


def _remove(*paths: Path) -> list[str]:
    removed = [str(path) for path in paths if path.exists()]
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    return removed
