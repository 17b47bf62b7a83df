"""`/doppel train`: run the pipeline for one person and tell the requester how it went.

With `PREFECT_API_URL` set, the request becomes a run of the Prefect deployment
`train-user` (on whatever workers serve it), which is then followed to its end.
Otherwise a background worker runs `doppel pipeline` in a child process, so that
training never competes with the app for its interpreter. Either way progress goes to
the requester as direct messages (`chat.postMessage`): a slash command's `response_url`
dies after 30 minutes, and trainings take longer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

from doppel.config import Settings
from doppel.store.database import Database
from serving.slack.state import add_training_request, update_training_request

Notify = Callable[[str], None]
POLL_SECONDS = 15.0
log = logging.getLogger(__name__)


class Trainer:
    """A queue of trainings, `pipeline.training_slots` at a time."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._pool = ThreadPoolExecutor(settings.pipeline.training_slots, "doppel-train")
        self._stopping = threading.Event()
        self._children: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def submit(self, workspace_id: str, user_id: str, label: str, by: str, notify: Notify) -> int:
        """Queue a training; returns the request id that `/doppel status` shows."""
        request_id = add_training_request(self.db, workspace_id, user_id, by)
        self._pool.submit(self._run, request_id, workspace_id, user_id, label, notify)
        return request_id

    def close(self) -> None:
        """Stop following trainings and end the child processes still training."""
        self._stopping.set()
        with self._lock:
            for child in self._children:
                child.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(
        self, request_id: int, workspace_id: str, user_id: str, label: str, notify: Notify
    ) -> None:
        try:
            if self.settings.prefect_api_url:
                status, detail = self._run_deployment(request_id, workspace_id, user_id, notify)
            else:
                status, detail = self._run_locally(request_id, workspace_id, user_id, label, notify)
        except Exception as error:  # whatever went wrong, the requester hears of it
            log.exception("training %s of %s/%s failed", request_id, workspace_id, user_id)
            status, detail = "failed", f"{type(error).__name__}: {error}"
        update_training_request(self.db, request_id, status, detail)
        verb = "finished" if status == "done" else "failed"
        notify(f"Training of {label} {verb}: {detail}")

    # -- without Prefect: `doppel pipeline` in a child process -------------------------

    def _run_locally(
        self, request_id: int, workspace_id: str, user_id: str, label: str, notify: Notify
    ) -> tuple[str, str]:
        from doppel.registry import tracking_uri

        command = [sys.executable, "-m", "doppel.cli", "pipeline", "--user", user_id]
        command += ["--workspace", workspace_id, "--json", *self._recipe_args()]
        env = os.environ | {
            "DOPPEL_HOME": str(self.settings.home.resolve()),
            "DATABASE_URL": self.settings.db_url,
            "MLFLOW_TRACKING_URI": tracking_uri(self.settings),
        }
        update_training_request(self.db, request_id, "running", "doppel pipeline")
        notify(
            f"Training of {label} started: dataset, training, evaluation against the base "
            "model, then the promotion gate. I will tell you here when it is done."
        )
        with self._lock:
            if self._stopping.is_set():
                return "failed", "the Slack app stopped before the training started"
            child = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            self._children.add(child)
        try:
            stdout, stderr = child.communicate()
        finally:
            with self._lock:
                self._children.discard(child)
        if child.returncode != 0:
            lines = [line for line in stderr.splitlines() if line.strip()]
            return "failed", " ".join(lines[-2:]) or f"exit status {child.returncode}"
        (outcome,) = json.loads(stdout.strip().splitlines()[-1])
        return "done", describe(outcome)

    def _recipe_args(self) -> list[str]:
        app = self.settings.slack_app
        args = ["--config", str(app.train_config)] if app.train_config else []
        return args + (["--max-steps", str(app.train_max_steps)] if app.train_max_steps else [])

    # -- with Prefect: the `train-user` deployment -------------------------------------

    def _run_deployment(
        self, request_id: int, workspace_id: str, user_id: str, notify: Notify
    ) -> tuple[str, str]:
        from prefect import get_client
        from prefect.client.schemas.objects import FlowRun
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        app = self.settings.slack_app
        parameters: dict[str, object] = {"user": user_id, "workspace": workspace_id}
        if app.train_config:
            parameters["config"] = str(app.train_config)
        if app.train_max_steps:
            parameters["max_steps"] = app.train_max_steps
        with temporary_settings({PREFECT_API_URL: self.settings.prefect_api_url}):
            run = run_deployment(app.deployment, parameters=parameters, timeout=0)
            # A pool thread has no event loop, so Prefect runs the sync version: no coroutine.
            assert isinstance(run, FlowRun)
            update_training_request(
                self.db, request_id, "running", f"Prefect flow run {run.name}", str(run.id)
            )
            notify(
                f"Training queued as Prefect flow run `{run.name}` of `{app.deployment}`. "
                "I will tell you here when it is done."
            )
            with get_client(sync_client=True) as client:
                return self._follow(client, run.id)

    def _follow(self, client: object, run_id: UUID) -> tuple[str, str]:
        while True:
            state = client.read_flow_run(run_id).state  # type: ignore[attr-defined]
            if state is not None and state.is_final():
                detail = f"Prefect flow run {state.name.lower()}"
                return ("done" if state.is_completed() else "failed"), (
                    detail + (f": {state.message}" if state.message else "")
                )
            if self._stopping.wait(POLL_SECONDS):
                return "failed", "the Slack app stopped following the flow run"


def describe(outcome: dict) -> str:
    """The pipeline's outcome in one sentence."""
    metrics = outcome.get("metrics") or {}
    loss = (
        f" (validation loss {metrics['eval_loss']:.3f}, base model {metrics['base_eval_loss']:.3f})"
        if {"eval_loss", "base_eval_loss"} <= set(metrics)
        else ""
    )
    version = f"version {outcome['version']} " if outcome.get("version") else ""
    return f"{version}{outcome['outcome']}{loss}: {outcome.get('reason', '')}".rstrip(": ")
