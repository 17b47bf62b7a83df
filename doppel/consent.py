"""Consent: only people who opted in are trained or impersonated.

Opting out stops the person's trainings and deletes what DoppelBot made of them: their
datasets, their training run folders, their registered model with every version, and
every MLflow run tagged with them (adapters, dataset copies, evaluation replies). Their
messages stay in the store, which mirrors Slack and would get them back at the next
ingest, but the revoked consent keeps them out of every dataset from then on: their own
and, as context, everyone else's.

A revoke takes effect everywhere without waiting: serving checks consent per request
(`ConsentCache`), and a training or promotion that outlives the revoke checks again
before and after it writes (`stop_if_withdrawn`), deleting what it made.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Callable
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


class ConsentCache:
    """Who consents, as last read from the database, re-read once it is `max_age` seconds
    old: serving checks every request without a query each, and a revoke still stops a
    persona within `max_age` on every replica. Thread-safe; `allows` may read the database,
    so async code calls it in a thread."""

    def __init__(self, db_url: str, max_age: float) -> None:
        self._db_url = db_url
        self._max_age = max_age
        self._people: frozenset[tuple[str, str]] = frozenset()
        self._read_at = -math.inf
        self._lock = threading.Lock()

    def allows(self, workspace_id: str, user_id: str) -> bool:
        """Whether the person consents, as of at most `max_age` seconds ago."""
        with self._lock:
            if time.monotonic() - self._read_at >= self._max_age:
                self._read()
            return (workspace_id, user_id) in self._people

    def reread(self) -> None:
        """Read who consents now, whatever the age of the last read."""
        with self._lock:
            self._read()

    def known(self) -> frozenset[tuple[str, str]]:
        """(workspace_id, user_id) of everyone who consented at the last read; no I/O."""
        return self._people

    def _read(self) -> None:
        started = time.monotonic()  # the age counts from before the query, never after
        with database(self._db_url).session() as session:
            rows = session.execute(
                select(Enrollment.workspace_id, Enrollment.user_id).where(
                    Enrollment.granted.is_(True)
                )
            )
            self._people = frozenset((row.workspace_id, row.user_id) for row in rows)
        self._read_at = started


@dataclass
class Deletion:
    """What opting out removed, so it can be confirmed to the person, and what it could not."""

    workspace_id: str
    user_id: str
    trainings_cancelled: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    run_folders: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)  # Registry.delete_person's answer
    personas_cleared: list[str] = field(default_factory=list)  # channel ids, "*" = workspace
    messages_excluded: int = 0
    failed: list[str] = field(default_factory=list)  # what is left, and why

    @property
    def complete(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        versions = self.model.get("versions") or []
        runs = self.model.get("runs") or []
        cancelled = self.trainings_cancelled
        return [
            *([f"trainings cancelled: {', '.join(cancelled)}"] if cancelled else []),
            f"datasets deleted: {len(self.datasets)}",
            f"training run folders deleted: {len(self.run_folders)}",
            f"registry versions deleted: {', '.join(versions) or 'none'}"
            + (f" (model {self.model['name']})" if versions else ""),
            f"adapters deleted (MLflow runs and their artifacts): {len(runs)}",
            f"active persona cleared in: {', '.join(self.personas_cleared) or 'nowhere'}",
            f"stored messages now left out of every dataset: {self.messages_excluded}",
            *(f"NOT deleted: {problem}" for problem in self.failed),
        ]


def revoke(
    settings: Settings,
    db: Database,
    workspace_id: str,
    user_id: str,
    by: str,
    stop_trainings: Callable[[list[str]], list[str]] | None = None,
) -> Deletion:
    """Withdraw consent, stop the person's trainings, then delete their datasets, run
    folders, adapters, MLflow runs and versions.

    Consent is withdrawn first and on its own, so it holds even if what follows fails,
    and a training still running sees it before it registers or promotes anything.
    `stop_trainings` (the Slack app's queue, Prefect; the library imports neither) runs
    before the deletion, so that no training writes while we delete: it returns what it
    cancelled and adds what it could not cancel to the list it is given. What cannot be
    deleted is reported in `failed`, never skipped in silence; running `revoke` again
    finishes the job.
    """
    deletion = Deletion(workspace_id, user_id)
    _withdraw(db, deletion, by)
    if stop_trainings is not None:
        try:
            deletion.trainings_cancelled = stop_trainings(deletion.failed)
        except Exception as error:
            message = error.message if isinstance(error, DoppelError) else str(error)
            deletion.failed.append(f"stopping their trainings: {message}")
    _delete(settings, deletion)
    return deletion


def stop_if_withdrawn(settings: Settings, workspace_id: str, user_id: str) -> None:
    """For jobs that can outlive a revoke (training, promotion): when the person withdrew
    consent meanwhile, delete what was made of them, as the revoke does, and stop the job.

    Jobs call it after each write a revoke must not miss (their run, a version, the
    `production` alias). A revoke withdraws consent before it deletes, so whichever of the
    two comes second sees the other's work, and nothing is left behind either way."""
    with database(settings.db_url).session() as session:
        if has_consent(session, workspace_id, user_id):
            return
    deletion = Deletion(workspace_id, user_id)
    _delete(settings, deletion)
    stopped = f"user {user_id} of workspace {workspace_id} withdrew consent; the job stopped"
    if deletion.complete:
        raise DoppelError(f"{stopped} and kept nothing", "nothing to do: all of it is deleted")
    raise DoppelError(
        f"{stopped}, but some of what it made is left: {'; '.join(deletion.failed)}",
        f"fix that, then run 'doppel consent revoke {user_id} --workspace {workspace_id}'",
    )


def _withdraw(db: Database, deletion: Deletion, by: str) -> None:
    """Record the revoke and clear the person's personas, in one transaction."""
    person = {"workspace_id": deletion.workspace_id, "user_id": deletion.user_id}
    mine = (
        (ActivePersona.workspace_id == deletion.workspace_id),
        (ActivePersona.user_id == deletion.user_id),
    )
    with db.transaction() as session:
        upsert(
            session,
            Enrollment,
            [{**person, "granted": False, "changed_by": by, "changed_at": utcnow()}],
            ENROLLMENT_FIELDS,
        )
        deletion.personas_cleared = sorted(
            session.scalars(select(ActivePersona.channel_id).where(*mine))
        )
        session.execute(delete(ActivePersona).where(*mine))
        deletion.messages_excluded = int(
            session.scalar(
                select(func.count())
                .select_from(Message)
                .where(
                    Message.workspace_id == deletion.workspace_id,
                    Message.user_id == deletion.user_id,
                )
            )
            or 0
        )


def _delete(settings: Settings, deletion: Deletion) -> None:
    """Everything made of the person: datasets (with build leftovers), run folders, and in
    MLflow their model, versions and runs. Failures go to `deletion.failed`."""
    from doppel.registry import Registry, model_name  # MLflow is slow to import

    workspace_id, user_id = deletion.workspace_id, deletion.user_id
    dataset = settings.dataset_dir(workspace_id, user_id)
    leftovers = sorted(dataset.parent.glob(f".{dataset.name}.*"))  # .previous, staging
    deletion.datasets = _remove([dataset, *leftovers], deletion.failed)
    runs = settings.run_dir(workspace_id, user_id)
    folders = sorted(runs.iterdir()) if runs.is_dir() else []
    _remove([runs], deletion.failed)
    deletion.run_folders = [str(folder) for folder in folders if not folder.exists()]
    deletion.model = {"name": model_name(workspace_id, user_id), "versions": [], "runs": []}
    try:
        registry = Registry(settings)
    except DoppelError as error:
        deletion.failed.append(f"the adapters and versions in MLflow: {error.message}")
        return
    deletion.model = registry.delete_person(workspace_id, user_id, deletion.failed)


def _remove(paths: list[Path], failed: list[str]) -> list[str]:
    """Delete folders; returns those that existed and are gone, and adds the others to
    `failed` with the reason."""
    removed = []
    for path in [path for path in paths if path.exists()]:
        error: OSError | None = None
        for _attempt in range(3):  # a job stopping at the same time may delete entries too
            try:
                shutil.rmtree(path)
            except FileNotFoundError as missing:
                error = missing
                continue
            except OSError as problem:
                error = problem
            break
        if not path.exists():
            removed.append(str(path))
        else:
            reason = f"{error.strerror or error}" if error else "written again while deleting"
            failed.append(f"{path}: {reason}")
    return removed
