"""Evaluate a registered version against base and production, and apply the gate."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial

from prefect import flow, task

from doppel.config import get_settings
from doppel.consent import stop_if_withdrawn
from doppel.evaluate.run import evaluate_version
from flows.common import person_ids, transient


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=transient)
def evaluate_task(workspace_id: str, user_id: str, version: str | None, gate: bool) -> dict:
    """Score and gate; promotes nobody who opted out meanwhile (and keeps nothing of them)."""
    settings = get_settings()
    recheck = partial(stop_if_withdrawn, settings, workspace_id, user_id)
    return asdict(evaluate_version(settings, workspace_id, user_id, version, gate, recheck))


@flow(name="evaluate")
def evaluate_flow(
    user: str, workspace: str | None = None, version: str | None = None, gate: bool = True
) -> dict:
    """Score `version` (default: the challenger); with `gate`, promote it if it is better."""
    workspace_id, user_id = person_ids(get_settings(), user, workspace)
    return evaluate_task(workspace_id, user_id, version, gate)
