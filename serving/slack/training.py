"""`/doppel train`: run the pipeline for one person and tell the requester how it went.

With `PREFECT_API_URL` set, the request becomes a run of the Prefect deployment
`train-user` (on whatever workers serve it), which is then followed to its end.
Otherwise a background worker runs `doppel pipeline` in a child process, so that
training never competes with the app for its interpreter. Either way progress goes to
the requester as direct messages (`chat.postMessage`): a slash command's `response_url`
dies after 30 minutes, and trainings take longer.

An opt-out cancels the person's trainings (`Trainer.cancel`, `cancel_trainings`): queued
ones never start, a child process is ended, a Prefect flow run is cancelled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID

from doppel.config import Settings
from doppel.store.database import Database
from serving.slack.child_env import training_env
from serving.slack.state import (
    CANCELLED,
    add_training_request,
    cancel_training_requests,
    training_cancelled,
    update_training_request,
)

Notify = Callable[[str], None]
POLL_SECONDS = 15.0  # how often a training is checked on: its flow run, its cancellation
STOP_SECONDS = 60.0  # a child told to stop (SIGTERM) gets this long before SIGKILL
log = logging.getLogger(__name__)


class Trainer:
    """A queue of trainings, `pipeline.training_slots` at a time."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self._pool = ThreadPoolExecutor(settings.pipeline.training_slots, "doppel-train")
        self._stopping = threading.Event()
        self._children: dict[int, subprocess.Popen] = {}  # request id -> `doppel pipeline`
        self._lock = threading.Lock()

    def submit(self, workspace_id: str, user_id: str, label: str, by: str, notify: Notify) -> int:
        """Queue a training; returns the request id that `/doppel status` shows."""
        request_id = add_training_request(self.db, workspace_id, user_id, by)
        self._pool.submit(self._run, request_id, workspace_id, user_id, label, notify)
        return request_id

    def cancel(self, workspace_id: str, user_id: str, failed: list[str]) -> list[str]:
        """Cancel the person's trainings (they opted out): queued ones never start, running
        children are ended and waited for, Prefect flow runs cancelled. Returns what was
        cancelled; what could not be is added to `failed`."""
        requests = cancel_training_requests(self.db, workspace_id, user_id)
        with self._lock:
            children = [self._children[id_] for id_ in requests if id_ in self._children]
        _end(children)
        return _cancel_flow_runs(self.settings, requests, failed)

    def close(self) -> None:
        """Stop following trainings and end the child processes still training."""
        self._stopping.set()
        with self._lock:
            children = list(self._children.values())
        _end(children)
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
        if update_training_request(self.db, request_id, status, detail) == CANCELLED:
            notify(f"Training of {label} was cancelled: consent was withdrawn.")
            return
        verb = "finished" if status == "done" else "failed"
        notify(f"Training of {label} {verb}: {detail}")

    # -- without Prefect: `doppel pipeline` in a child process -------------------------

    def _run_locally(
        self, request_id: int, workspace_id: str, user_id: str, label: str, notify: Notify
    ) -> tuple[str, str]:
        from doppel.registry import tracking_uri

        command = [sys.executable, "-m", "doppel.cli", "pipeline", "--user", user_id]
        command += ["--workspace", workspace_id, "--json", *self._recipe_args()]
        env = training_env(
            DOPPEL_HOME=str(self.settings.home.resolve()),
            DATABASE_URL=self.settings.db_url,
            MLFLOW_TRACKING_URI=tracking_uri(self.settings),
        )
        if update_training_request(self.db, request_id, "running", "doppel pipeline") == CANCELLED:
            return CANCELLED, "consent withdrawn before it started"
        notify(
            f"Training of {label} started: dataset, training, evaluation against the base "
            "model, then the promotion gate. I will tell you here when it is done."
        )
        with self._lock:  # `cancel` collects children under this lock, after the database
            if self._stopping.is_set():
                return "failed", "the Slack app stopped before the training started"
            if training_cancelled(self.db, request_id):
                return CANCELLED, "consent withdrawn before it started"
            child = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its own process group: what it starts ends with it
            )
            self._children[request_id] = child
        try:
            stdout, stderr = self._follow_child(request_id, child)
        finally:
            with self._lock:
                self._children.pop(request_id, None)
        if child.returncode != 0:
            lines = [line for line in stderr.splitlines() if line.strip()]
            return "failed", " ".join(lines[-2:]) or f"exit status {child.returncode}"
        (outcome,) = json.loads(stdout.strip().splitlines()[-1])
        return "done", describe(outcome)

    def _follow_child(self, request_id: int, child: subprocess.Popen) -> tuple[str, str]:
        """The child's output once it exits. A request cancelled elsewhere (an opt-out from
        the CLI or another replica) ends it within POLL_SECONDS."""
        told_to_stop: float | None = None
        while True:
            try:
                stdout, stderr = child.communicate(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:  # communicate() can be called again, losing nothing
                if told_to_stop is None and training_cancelled(self.db, request_id):
                    told_to_stop = time.monotonic()
                    child.terminate()
                elif told_to_stop is not None and time.monotonic() > told_to_stop + STOP_SECONDS:
                    _kill_group(child)
        _kill_group(child)  # what it started (Prefect's temporary server), if still there
        return stdout, stderr

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
        if training_cancelled(self.db, request_id):
            return CANCELLED, "consent withdrawn before it started"
        with temporary_settings({PREFECT_API_URL: self.settings.prefect_api_url}):
            run = run_deployment(app.deployment, parameters=parameters, timeout=0)
            # A pool thread has no event loop, so Prefect runs the sync version: no coroutine.
            assert isinstance(run, FlowRun)
            status = update_training_request(
                self.db, request_id, "running", f"Prefect flow run {run.name}", str(run.id)
            )
            if status == CANCELLED:  # the opt-out came while the run was being created
                failed: list[str] = []
                _cancel_flow_runs(self.settings, {request_id: str(run.id)}, failed)
                return CANCELLED, "; ".join(failed) or "consent withdrawn"
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


def cancel_trainings(
    settings: Settings, db: Database, workspace_id: str, user_id: str, failed: list[str]
) -> list[str]:
    """`Trainer.cancel` for an opt-out outside the Slack app (`doppel consent revoke`): the
    requests are cancelled and their Prefect flow runs too; a Slack app's child process
    sees the cancellation within POLL_SECONDS and is ended."""
    return _cancel_flow_runs(settings, cancel_training_requests(db, workspace_id, user_id), failed)


def _cancel_flow_runs(
    settings: Settings, requests: dict[int, str | None], failed: list[str]
) -> list[str]:
    """Cancel the Prefect flow runs of cancelled requests. A run not started yet is
    cancelled outright; a started one goes to Cancelling, and its worker ends its process.
    Returns every request cancelled; the flow runs that could not be go to `failed`."""
    cancelled = [f"request {id_}" for id_, flow_run in requests.items() if flow_run is None]
    flow_runs = {id_: flow_run for id_, flow_run in requests.items() if flow_run}
    if not flow_runs:
        return cancelled
    if not settings.prefect_api_url:
        failed += [
            f"Prefect flow run {flow_run}: PREFECT_API_URL is not set here to cancel it"
            for flow_run in flow_runs.values()
        ]
        return cancelled
    from prefect import get_client
    from prefect.client.schemas.objects import State
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Cancelling

    reason = "consent withdrawn"
    with (
        temporary_settings({PREFECT_API_URL: settings.prefect_api_url}),
        get_client(sync_client=True) as client,
    ):
        for id_, flow_run in flow_runs.items():
            try:
                state = client.read_flow_run(UUID(flow_run)).state
                if state is not None and state.is_final():
                    continue  # it ended already: consent re-checks cover what it made
                waiting = state is None or state.is_scheduled() or state.is_paused()
                new: State = Cancelled(message=reason) if waiting else Cancelling(message=reason)
                result = client.set_flow_run_state(UUID(flow_run), new)
            except Exception as error:  # not found, Prefect unreachable
                failed.append(f"Prefect flow run {flow_run}: {str(error).splitlines()[0][:200]}")
                continue
            if result.status != SetStateStatus.ACCEPT:
                why = getattr(result.details, "reason", None) or result.status.value
                failed.append(f"Prefect flow run {flow_run}: Prefect refused to cancel it ({why})")
                continue
            cancelled.append(f"request {id_} (Prefect flow run {flow_run})")
    return cancelled


def _end(children: list[subprocess.Popen]) -> None:
    """SIGTERM to each child (training turns it into a clean stop), then SIGKILL to each
    process group still there after STOP_SECONDS."""
    for child in children:
        child.terminate()
    deadline = time.monotonic() + STOP_SECONDS
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        _kill_group(child)


def _kill_group(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)


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
