"""The whole chain: ingest -> dataset -> train -> evaluate -> gate.

`user_pipeline_flow` runs it for one person (the `train-user` deployment, and `/doppel
train` in Slack, which passes the workspace id); `retrain_flow` runs it nightly: it
ingests every workspace we hold a token for, each with its own (`doppel.slack.tokens`),
then retrains every person who opted in and has enough new samples, workspace by
workspace, each in a subflow of its own so that one failure never stops the others.
Nobody is trained without consent.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from sqlalchemy import select

from doppel.config import Settings, get_settings
from doppel.consent import consented_users, require_consent
from doppel.errors import DoppelError
from doppel.registry import Registry, model_name
from doppel.slack.tokens import find_token, ingestible_workspaces
from doppel.store.database import database
from doppel.store.lookup import resolve_workspace
from doppel.store.models import Workspace
from flows.common import person_ids
from flows.dataset import build_dataset_task
from flows.evaluate import evaluate_task
from flows.ingest import ingest_flow
from flows.train import train_task


def workspace_id_of(settings: Settings, workspace: str | None) -> str | None:
    """The id of a workspace named by id or name; an id the store does not know yet (an
    OAuth install not ingested so far) stands for itself."""
    if workspace is None:
        return None
    with database(settings.db_url).session() as session:
        known = session.scalars(select(Workspace).order_by(Workspace.id)).all()
    return next((w.id for w in known if workspace in (w.id, w.name)), workspace)


def has_token(settings: Settings, workspace_id: str | None) -> bool:
    """Whether we can ingest the workspace (None: the configured token's, or the only
    installation's); without a token, training uses what the store holds."""
    return find_token(settings, database(settings.db_url).engine, workspace_id) is not None


@flow(name="user-pipeline")
def user_pipeline_flow(
    user: str,
    workspace: str | None = None,
    config: str | None = None,
    max_steps: int | None = None,
    min_new_samples: int = 0,
    ingest: bool = True,
) -> dict:
    """Dataset, training, evaluation and the gate for one person (ingest first when we
    hold a token for the workspace). Skips training when fewer than `min_new_samples`
    samples are new."""
    settings = get_settings()
    if ingest:
        workspace_id = workspace_id_of(settings, workspace)
        if has_token(settings, workspace_id):
            ingest_flow(workspace=workspace_id)
    require_consent(settings, *person_ids(settings, user, workspace))
    dataset = build_dataset_task(user, workspace, None, None, None)
    workspace_id, user_id = dataset["workspace_id"], dataset["user_id"]
    new = dataset["train"] - _last_trained_samples(workspace_id, user_id)
    if new < min_new_samples:
        return {
            "workspace_id": workspace_id,
            "user_id": user_id,
            "outcome": "skipped",
            "reason": f"{new} new samples",
        }
    trained = train_task(workspace_id, user_id, config, max_steps)
    evaluation = evaluate_task(workspace_id, user_id, trained["version"], True)
    decision = evaluation["decision"]
    return {
        "workspace_id": workspace_id,
        "user_id": user_id,
        "outcome": "promoted" if decision["promote"] else "kept production",
        "version": trained["version"],
        "reason": decision["reason"],
        "metrics": evaluation["metrics"],
    }


@flow(name="nightly-retrain")
def retrain_flow(
    workspace: str | None = None,
    config: str | None = None,
    max_steps: int | None = None,
    min_new_samples: int | None = None,
) -> list[dict]:
    """Incremental ingest of the workspace, or of every workspace we hold a token for,
    each with its own token; then every enrolled person with enough new samples."""
    settings = get_settings()
    workspace_id = workspace_id_of(settings, workspace)
    if workspace_id is None:
        targets = ingestible_workspaces(settings, database(settings.db_url).engine)
    else:
        targets = [workspace_id] if has_token(settings, workspace_id) else []
    for target in targets:
        state = ingest_flow(workspace=target, return_state=True)
        if not state.is_completed():  # its people are retrained on what the store holds
            get_run_logger().warning("ingest of workspace %s failed: %s", target, state.message)
    threshold = settings.pipeline.min_new_samples if min_new_samples is None else min_new_samples
    outcomes = []
    for stored in stored_workspaces(settings, workspace):
        for user_id in enrolled_users(stored):
            state = user_pipeline_flow(
                user_id,
                stored,
                config,
                max_steps,
                min_new_samples=threshold,
                ingest=False,
                return_state=True,
            )
            if state.is_completed():
                outcomes.append(state.result())
            else:
                failed = {"outcome": "failed", "reason": state.message}
                outcomes.append({"workspace_id": stored, "user_id": user_id, **failed})
    return outcomes


def stored_workspaces(settings: Settings, workspace: str | None) -> list[str]:
    """The workspace named, or every workspace in the store."""
    with database(settings.db_url).session() as session:
        if workspace is not None:
            return [resolve_workspace(session, workspace).id]
        ids = list(session.scalars(select(Workspace.id).order_by(Workspace.id)))
    if not ids:
        raise DoppelError(
            "no workspace has been ingested yet",
            "run 'doppel ingest export PATH' or 'doppel ingest slack' first",
        )
    return ids


def enrolled_users(workspace_id: str) -> list[str]:
    """People of this workspace who opted in (`/doppel optin`, `doppel consent grant`)."""
    with database(get_settings().db_url).session() as session:
        return consented_users(session, workspace_id)


def _last_trained_samples(workspace_id: str, user_id: str) -> int:
    versions = Registry(get_settings()).versions(model_name(workspace_id, user_id))
    return int(versions[-1].tags.get("train_samples", 0)) if versions else 0
