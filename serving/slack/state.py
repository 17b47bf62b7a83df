"""What the Slack app keeps per workspace: active personas, limits, handled events and
training requests. Every function takes the workspace id, and every query filters on it:
one workspace never reads another's state. The exceptions serve the training queue,
which is shared by every workspace so that it can be fair between them: they read
request ids and statuses, never what a workspace said.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from doppel.config import SlackAppSettings
from doppel.consent import consented_users
from doppel.store.database import Database, upsert
from doppel.store.models import (
    ActivePersona,
    SlackEvent,
    TrainingRequest,
    WorkspaceLimits,
    utcnow,
)

WORKSPACE_WIDE = "*"  # the `channel_id` of a workspace's default persona
EVENT_MEMORY = timedelta(days=1)  # Slack retries for minutes; a day is plenty
PERSONA_FIELDS = ("user_id", "set_by", "set_at")
QUEUED, RUNNING, CANCELLED = "queued", "running", "cancelled"  # training request statuses
OPEN = (QUEUED, RUNNING)  # then "done" or "failed", unless cancelled


# -- personas -----------------------------------------------------------------------------


def set_persona(
    session: Session, workspace_id: str, channel_id: str, user_id: str, by: str
) -> None:
    """Make `user_id` answer mentions in `channel_id` (or workspace-wide with "*")."""
    row = {"workspace_id": workspace_id, "channel_id": channel_id, "user_id": user_id}
    upsert(session, ActivePersona, [{**row, "set_by": by, "set_at": utcnow()}], PERSONA_FIELDS)


def active_persona(session: Session, workspace_id: str, channel_id: str) -> str | None:
    """The channel's persona, else the workspace's, else the only person who opted in."""
    enrolled = consented_users(session, workspace_id)
    for scope in (channel_id, WORKSPACE_WIDE):
        row = session.get(ActivePersona, (workspace_id, scope))
        if row is not None and row.user_id in enrolled:
            return row.user_id
    return enrolled[0] if len(enrolled) == 1 else None


def persona_scopes(session: Session, workspace_id: str) -> dict[str, str]:
    """channel id (or "*") -> the persona active there."""
    rows = session.scalars(select(ActivePersona).where(ActivePersona.workspace_id == workspace_id))
    return {row.channel_id: row.user_id for row in rows}


# -- limits ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    max_enrolled: int
    trainings_per_day: int


def limits(session: Session, workspace_id: str, defaults: SlackAppSettings) -> Limits:
    """The workspace's limits: an operator's where set, else the settings' defaults."""
    row = session.get(WorkspaceLimits, workspace_id)
    max_enrolled = row.max_enrolled if row else None
    per_day = row.trainings_per_day if row else None
    return Limits(
        defaults.max_enrolled if max_enrolled is None else max_enrolled,
        defaults.trainings_per_day if per_day is None else per_day,
    )


def set_limits(
    session: Session,
    workspace_id: str,
    max_enrolled: int | None = None,
    trainings_per_day: int | None = None,
) -> None:
    """Override a workspace's limits; a None leaves that limit as it was."""
    row = session.get(WorkspaceLimits, workspace_id)
    if row is None:
        row = WorkspaceLimits(workspace_id=workspace_id)
        session.add(row)
    if max_enrolled is not None:
        row.max_enrolled = max_enrolled
    if trainings_per_day is not None:
        row.trainings_per_day = trainings_per_day


# -- Slack events ---------------------------------------------------------------------------


def first_delivery(db: Database, event_id: str, workspace_id: str) -> bool:
    """Record an event id; False when it was recorded before (a Slack retry).

    The primary key decides, so two deliveries racing on two replicas still yield one
    True. Events older than a day are forgotten on the way.
    """
    try:
        with db.transaction() as session:
            session.execute(
                delete(SlackEvent).where(SlackEvent.received_at < utcnow() - EVENT_MEMORY)
            )
            session.add(SlackEvent(event_id=event_id, workspace_id=workspace_id))
    except IntegrityError:
        return False
    return True


# -- training requests ----------------------------------------------------------------------


def add_training_request(db: Database, workspace_id: str, user_id: str, by: str) -> int:
    with db.transaction() as session:
        row = TrainingRequest(workspace_id=workspace_id, user_id=user_id, requested_by=by)
        session.add(row)
        session.flush()
        return row.id


def update_training_request(
    db: Database,
    request_id: int,
    status: str,
    detail: str | None = None,
    flow_run: str | None = None,
) -> str:
    """Record how a training goes; returns the request's status now. A cancelled request
    (its person opted out) stays cancelled, its flow run still recorded so it can be
    cancelled too."""
    with db.transaction() as session:
        row = session.get(TrainingRequest, request_id)
        if row is None:
            raise LookupError(f"training request {request_id} is not in the database")
        row.flow_run = flow_run or row.flow_run
        if row.status == CANCELLED:
            return CANCELLED
        row.status = status
        row.detail = detail if detail is not None else row.detail
        if status in ("done", "failed"):
            row.finished_at = utcnow()
        return status


def cancel_training_requests(
    db: Database, workspace_id: str, user_id: str
) -> dict[int, str | None]:
    """Mark the person's queued and running trainings cancelled, so none starts or is
    reported done; returns their ids with their Prefect flow run ids (None: run locally)."""
    with db.transaction() as session:
        rows = session.scalars(
            select(TrainingRequest).where(
                TrainingRequest.workspace_id == workspace_id,
                TrainingRequest.user_id == user_id,
                TrainingRequest.status.in_(OPEN),
            )
        ).all()
        for row in rows:
            row.status, row.detail, row.finished_at = CANCELLED, "consent withdrawn", utcnow()
        return {row.id: row.flow_run for row in rows}


@dataclass(frozen=True)
class Waiting:
    """A queued training request, as the trainer's fair choice needs it."""

    id: int
    workspace_id: str
    flow_run: str | None  # a Prefect flow run it started before the Slack app restarted


def waiting_training_requests(db: Database) -> list[Waiting]:
    """Every queued training request of every workspace, oldest first."""
    with db.session() as session:
        rows = session.execute(
            select(TrainingRequest.id, TrainingRequest.workspace_id, TrainingRequest.flow_run)
            .where(TrainingRequest.status == QUEUED)
            .order_by(TrainingRequest.id)
        )
        return [Waiting(row.id, row.workspace_id, row.flow_run) for row in rows]


def claim_training_request(db: Database, request_id: int) -> TrainingRequest | None:
    """Mark a queued request running, if it is still queued; None if it is not.

    One conditional UPDATE decides, so of two trainers that pick the same request (two
    replicas, or an app and the one that replaces it) exactly one runs it, and a request
    cancelled meanwhile is never started.
    """
    with db.transaction() as session:
        claimed = session.execute(
            update(TrainingRequest)
            .where(TrainingRequest.id == request_id, TrainingRequest.status == QUEUED)
            .values(status=RUNNING)
            .execution_options(synchronize_session=False)
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return session.get(TrainingRequest, request_id)


def training_statuses(db: Database, request_ids: list[int]) -> dict[int, str]:
    with db.session() as session:
        rows = session.execute(
            select(TrainingRequest.id, TrainingRequest.status).where(
                TrainingRequest.id.in_(request_ids)
            )
        )
        return {row.id: row.status for row in rows}


def training_cancelled(db: Database, request_id: int) -> bool:
    with db.session() as session:
        row = session.get(TrainingRequest, request_id)
        return row is not None and row.status == CANCELLED


def trainings_since(session: Session, workspace_id: str, since: datetime) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(TrainingRequest)
            .where(
                TrainingRequest.workspace_id == workspace_id,
                TrainingRequest.requested_at >= since,
            )
        )
        or 0
    )


def recent_trainings(session: Session, workspace_id: str, limit: int = 5) -> list[TrainingRequest]:
    return list(
        session.scalars(
            select(TrainingRequest)
            .where(TrainingRequest.workspace_id == workspace_id)
            .order_by(TrainingRequest.id.desc())
            .limit(limit)
        )
    )
