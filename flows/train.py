"""Train one person's adapter and register it as the `challenger` version."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_client, task
from prefect.concurrency.sync import concurrency

from doppel.config import get_settings
from doppel.train.config import load_train_config
from doppel.train.run import train_user
from flows.common import person_ids, transient

TRAINING_LIMIT = "doppel-training"


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=transient)
def train_task(workspace_id: str, user_id: str, config: str | None, max_steps: int | None) -> dict:
    """One training job, holding a slot of the `doppel-training` concurrency limit."""
    settings = get_settings()
    recipe = load_train_config(Path(config) if config else None, max_steps=max_steps)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(
            TRAINING_LIMIT, settings.pipeline.training_slots
        )
    with concurrency(TRAINING_LIMIT, occupy=1, strict=True):
        trained = train_user(
            settings, workspace_id, user_id, settings.dataset_dir(workspace_id, user_id), recipe
        )
    return asdict(trained)


@flow(name="train")
def train_flow(
    user: str,
    workspace: str | None = None,
    config: str | None = None,
    max_steps: int | None = None,
) -> dict:
    """Train on the person's current dataset (see `build_dataset_flow`)."""
    workspace_id, user_id = person_ids(get_settings(), user, workspace)
    return train_task(workspace_id, user_id, config, max_steps)
