"""Train one person's adapter and register it as the `challenger` version."""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

from prefect import flow, get_client, task
from prefect.concurrency.sync import concurrency

from doppel.config import get_settings
from doppel.consent import stop_if_withdrawn
from doppel.train.config import load_train_config
from doppel.train.run import train_user
from flows.common import person_ids, transient

TRAINING_LIMIT = "doppel-training"


@task(retries=1, retry_delay_seconds=30, retry_condition_fn=transient)
def train_task(workspace_id: str, user_id: str, config: str | None, max_steps: int | None) -> dict:
    """One training job, holding a slot of the `doppel-training` concurrency limit. Only for
    someone who consents, and it keeps nothing if they opt out while it runs."""
    settings = get_settings()
    recipe = load_train_config(Path(config) if config else None, max_steps=max_steps)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(
            TRAINING_LIMIT, settings.pipeline.training_slots
        )
    recheck = partial(stop_if_withdrawn, settings, workspace_id, user_id)
    with concurrency(TRAINING_LIMIT, occupy=1, strict=True):
        recheck()  # opted out since the job began (its dataset build, the wait for a slot)?
        trained = train_user(
            settings,
            workspace_id,
            user_id,
            settings.dataset_dir(workspace_id, user_id),
            recipe,
            recheck,
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
