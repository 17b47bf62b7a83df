"""Build one user's dataset from the store, as a Prefect flow."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from doppel.config import get_settings
from doppel.dataset.build import build_dataset
from flows.common import transient


@task(retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def build_dataset_task(
    user: str,
    workspace: str | None,
    min_chars: int | None,
    gap_minutes: float | None,
    out: str | None,
) -> dict:
    built = build_dataset(
        get_settings(),
        user,
        workspace=workspace,
        min_chars=min_chars,
        gap_minutes=gap_minutes,
        out=Path(out) if out else None,
    )
    return {"path": str(built.path), **built.stats}


@flow(name="build-dataset")
def build_dataset_flow(
    user: str,
    workspace: str | None = None,
    min_chars: int | None = None,
    gap_minutes: float | None = None,
    out: str | None = None,
) -> dict:
    """Samples for `user` (id, name, display or real name), saved as a DatasetDict."""
    return build_dataset_task(user, workspace, min_chars, gap_minutes, out)
