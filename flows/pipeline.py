"""The whole chain: ingest -> dataset -> train -> evaluate -> gate.

`user_pipeline_flow` runs it for one person (the `train-user` deployment);
`retrain_flow` runs it nightly for every person of a workspace who opted in and has enough
new samples, each in a subflow of its own so that one failure never stops the others.
Nobody is trained without consent.
"""

from __future__ import annotations

from prefect import flow

from doppel.config import get_settings
from doppel.consent import consented_users, require_consent
from doppel.registry import Registry, model_name
from doppel.store.database import database
from doppel.store.lookup import resolve_workspace
from flows.common import person_ids
from flows.dataset import build_dataset_task
from flows.evaluate import evaluate_task
from flows.ingest import ingest_flow
from flows.train import train_task


def _slack_configured() -> bool:
    settings = get_settings()
    return bool(settings.slack_bot_token or settings.slack_user_token)


@flow(name="user-pipeline")
def user_pipeline_flow(
    user: str,
    workspace: str | None = None,
    config: str | None = None,
    max_steps: int | None = None,
    min_new_samples: int = 0,
    ingest: bool = True,
) -> dict:
    """Dataset, training, evaluation and the gate for one person (ingest first if Slack
    is configured). Skips training when fewer than `min_new_samples` samples are new."""
    if ingest and _slack_configured():
        ingest_flow()
    settings = get_settings()
    require_consent(settings, *person_ids(settings, user, workspace))
    dataset = build_dataset_task(user, workspace, None, None, None)
    workspace_id, user_id = dataset["workspace_id"], dataset["user_id"]
    new = dataset["train"] - _last_trained_samples(workspace_id, user_id)
    if new < min_new_samples:
        return {"user_id": user_id, "outcome": "skipped", "reason": f"{new} new samples"}
    trained = train_task(workspace_id, user_id, config, max_steps)
    evaluation = evaluate_task(workspace_id, user_id, trained["version"], True)
    decision = evaluation["decision"]
    return {
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
    """Incremental ingest, then every enrolled person with enough new samples."""
    settings = get_settings()
    if _slack_configured():
        ingest_flow()
    with database(settings.db_url).session() as session:
        workspace_id = resolve_workspace(session, workspace).id
    threshold = settings.pipeline.min_new_samples if min_new_samples is None else min_new_samples
    outcomes = []
    for user_id in enrolled_users(workspace_id):
        state = user_pipeline_flow(
            user_id,
            workspace_id,
            config,
            max_steps,
            min_new_samples=threshold,
            ingest=False,
            return_state=True,
        )
        if state.is_completed():
            outcomes.append(state.result())
        else:
            outcomes.append({"user_id": user_id, "outcome": "failed", "reason": state.message})
    return outcomes


def enrolled_users(workspace_id: str) -> list[str]:
    """People of this workspace who opted in (`/doppel optin`, `doppel consent grant`)."""
    with database(get_settings().db_url).session() as session:
        return consented_users(session, workspace_id)


def _last_trained_samples(workspace_id: str, user_id: str) -> int:
    versions = Registry(get_settings()).versions(model_name(workspace_id, user_id))
    return int(versions[-1].tags.get("train_samples", 0)) if versions else 0
