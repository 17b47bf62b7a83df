"""`/doppel train`: run the pipeline for one person and tell the requester how it went.

With `PREFECT_API_URL` set, the request becomes a run of the Prefect deployment
`train-user` (on whatever workers serve it), which is then followed to its end.
Otherwise a background worker runs `doppel pipeline` in a child process, so that
training never competes with the app for its interpreter. Either way progress goes to
the requester as direct messages (`chat.postMessage`): a slash command's `response_url`
dies after 30 minutes, and trainings take longer.

Requests wait in the database, and the Trainer starts one only when one of its
`pipeline.training_slots` is free, so Prefect never sees more runs from the app at once.
The choice is fair between workspaces: the workspace served least recently goes first,
each workspace's requests in the order they came (one workspace's ten requests do not
starve another's one). A request is claimed in the database before it starts, so a
restarted app, or a second replica, picks up what was queued without running anything
twice. An app that stops puts what it was running back in the queue: a local training
starts again, a Prefect flow run is followed again (not started again) when it is back.

An opt-out cancels the person's trainings (`Trainer.cancel`, `cancel_trainings`): queued
ones never start, a child process is ended, a Prefect flow run is cancelled.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from uuid import UUID

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from doppel.config import Settings
from doppel.slack.installations import installation_token
from doppel.store.database import Database
from doppel.store.models import TrainingRequest
from serving.slack.child_env import training_env
from serving.slack.people import Directory
from serving.slack.state import (
    CANCELLED,
    QUEUED,
    Waiting,
    add_training_request,
    cancel_training_requests,
    claim_training_request,
    training_cancelled,
    training_statuses,
    update_training_request,
    waiting_training_requests,
)

Notify = Callable[[str], None]
POLL_SECONDS = 15.0  # how often a training is checked on, and the queue read for new requests
STOP_SECONDS = 60.0  # a child told to stop (SIGTERM) gets this long before SIGKILL
CLAIM_TRIES = 20  # picks in a row that others may take first before a slot waits a poll
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Requester:
    """Whom a training reports to: the person trained, by name, and a DM to who asked."""

    label: str
    notify: Notify


@dataclass(frozen=True)
class Training:
    """A request claimed for a slot, ready to run."""

    request_id: int
    workspace_id: str
    user_id: str
    flow_run: str | None  # a Prefect flow run it started before the app restarted
    requester: Requester


Run = Callable[[Training], tuple[str, str]]  # a training to (status, detail)
Claimed = tuple[TrainingRequest, Requester | None]  # the requester when it was made here


class Trainer:
    """Trainings of every workspace, `pipeline.training_slots` at a time, fairly.

    `run` is what a slot does with a claimed training; by default the pipeline, through
    Prefect or in a child process.
    """

    def __init__(self, settings: Settings, db: Database, run: Run | None = None) -> None:
        self.settings = settings
        self.db = db
        self._run = run or self._pipeline
        self._stopping = threading.Event()
        self._children: dict[int, subprocess.Popen] = {}  # request id -> `doppel pipeline`
        self._lock = threading.Lock()  # the children
        # The queue's lock: held from reading the queue to waiting, so no submit is missed.
        self._queue = threading.Condition()
        self._requesters: dict[int, Requester] = {}  # requests made here, still queued
        self._served: dict[str, int] = {}  # workspace id -> the turn it last started one
        self._turns = itertools.count()
        self._slots = [
            threading.Thread(target=self._slot, name=f"doppel-train-{number}", daemon=True)
            for number in range(settings.pipeline.training_slots)
        ]
        for slot in self._slots:  # requests queued before a restart start as slots free up
            slot.start()

    def submit(self, workspace_id: str, user_id: str, label: str, by: str, notify: Notify) -> int:
        """Queue a training; returns the request id that `/doppel status` shows."""
        with self._queue:
            request_id = add_training_request(self.db, workspace_id, user_id, by)
            self._requesters[request_id] = Requester(label, notify)
            self._queue.notify()
        return request_id

    def cancel(self, workspace_id: str, user_id: str, failed: list[str]) -> list[str]:
        """Cancel the person's trainings (they opted out): queued ones never start, running
        children are ended and waited for, Prefect flow runs cancelled. Returns what was
        cancelled; what could not be is added to `failed`."""
        requests = cancel_training_requests(self.db, workspace_id, user_id)
        with self._queue:
            queued = [self._requesters.pop(id_) for id_ in requests if id_ in self._requesters]
        for requester in queued:
            _tell_cancelled(requester)
        with self._lock:
            children = [self._children[id_] for id_ in requests if id_ in self._children]
        _end(children)
        return _cancel_flow_runs(self.settings, requests, failed)

    def close(self) -> None:
        """Stop: start nothing more, end the child processes still training and put their
        requests back in the queue, stop following flow runs, and wait for the slots."""
        self._stopping.set()
        with self._queue:
            self._queue.notify_all()
        with self._lock:
            children = list(self._children.values())
        _end(children)
        for slot in self._slots:
            slot.join()

    # -- the fair queue ------------------------------------------------------------------

    def _slot(self) -> None:
        """One training at a time, while the app runs."""
        while not self._stopping.is_set():
            with self._queue:
                try:
                    claimed, gone = self._claim()
                except Exception:  # the database is away: try again later
                    log.exception("could not read the training queue")
                    claimed, gone = None, {}
                if claimed is None and not gone and not self._stopping.is_set():
                    self._queue.wait(POLL_SECONDS)
            try:
                self._forget(gone)
                if claimed is not None:
                    self._serve(*claimed)
            except Exception:  # the database went away mid-way: the slot lives on
                log.exception("the training queue could not record an outcome")

    def _claim(self) -> tuple[Claimed | None, dict[int, Requester]]:
        """The next request, claimed in the database, with its requester if it was made
        here; and the requesters of requests made here that left the queue some other way
        (cancelled from the CLI, or claimed by another replica). Call with the queue's lock."""
        for _ in range(CLAIM_TRIES):
            waiting = waiting_training_requests(self.db)
            ids = {request.id for request in waiting}
            gone = {id_: self._requesters.pop(id_) for id_ in set(self._requesters) - ids}
            if not waiting or self._stopping.is_set():
                return None, gone
            request = claim_training_request(self.db, fair_next(waiting, self._served).id)
            if request is not None:
                self._served[request.workspace_id] = next(self._turns)
                return (request, self._requesters.pop(request.id, None)), gone
            if gone:
                return None, gone
        return None, {}

    def _forget(self, gone: Mapping[int, Requester]) -> None:
        """Tell who asked for a request cancelled elsewhere; another replica that claimed
        one tells them itself."""
        if not gone:
            return
        statuses = training_statuses(self.db, list(gone))
        for id_, requester in gone.items():
            if statuses.get(id_) == CANCELLED:
                _tell_cancelled(requester)

    def _serve(self, request: TrainingRequest, requester: Requester | None) -> None:
        requester = requester or self._reach(request)
        training = Training(
            request.id, request.workspace_id, request.user_id, request.flow_run, requester
        )
        try:
            status, detail = self._run(training)
        except Exception as error:  # whatever went wrong, the requester hears of it
            log.exception(
                "training %s of %s/%s failed", request.id, request.workspace_id, request.user_id
            )
            status, detail = "failed", f"{type(error).__name__}: {error}"
        now = update_training_request(self.db, request.id, status, detail)
        if now == CANCELLED:
            _tell_cancelled(requester)
        elif now == QUEUED:
            requester.notify(f"Training of {requester.label} is back in the queue: {detail}")
        else:
            verb = "finished" if status == "done" else "failed"
            requester.notify(f"Training of {requester.label} {verb}: {detail}")

    def _reach(self, request: TrainingRequest) -> Requester:
        """The requester of a request made before a restart or on another replica: a DM
        through the workspace's bot token, else the log."""
        try:
            client = bot_client(self.settings, self.db, request.workspace_id)
            if client is not None:
                with self.db.session() as session:
                    label = Directory(session, request.workspace_id, client).label(request.user_id)
                return Requester(label, direct_messages(client, request.requested_by))
        except Exception:  # Slack or the installations away: the training runs all the same
            log.exception("cannot reach the requester of training %s", request.id)
        where = f"training {request.id} of {request.workspace_id}/{request.user_id}"
        return Requester(request.user_id, lambda text: log.info("%s: %s", where, text))

    def _pipeline(self, training: Training) -> tuple[str, str]:
        if self.settings.prefect_api_url:
            return self._run_deployment(training)
        return self._run_locally(training)

    # -- without Prefect: `doppel pipeline` in a child process -------------------------

    def _run_locally(self, training: Training) -> tuple[str, str]:
        from doppel.registry import tracking_uri

        request_id, label = training.request_id, training.requester.label
        command = [sys.executable, "-m", "doppel.cli", "pipeline", "--user", training.user_id]
        command += ["--workspace", training.workspace_id, "--json", *self._recipe_args()]
        env = training_env(
            DOPPEL_HOME=str(self.settings.home.resolve()),
            DATABASE_URL=self.settings.db_url,
            MLFLOW_TRACKING_URI=tracking_uri(self.settings),
        )
        if update_training_request(self.db, request_id, "running", "doppel pipeline") == CANCELLED:
            return CANCELLED, "consent withdrawn before it started"
        training.requester.notify(
            f"Training of {label} started: dataset, training, evaluation against the base "
            "model, then the promotion gate. I will tell you here when it is done."
        )
        with self._lock:  # `cancel` collects children under this lock, after the database
            if self._stopping.is_set():
                return QUEUED, "the Slack app stopped before it started; it starts when it is back"
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
        if child.returncode != 0 and self._stopping.is_set():
            return QUEUED, "the Slack app stopped during it; it starts again when the app is back"
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

    def _run_deployment(self, training: Training) -> tuple[str, str]:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.settings.prefect_api_url}):
            # One started before the app restarted is followed again, not started again.
            flow_run = training.flow_run or self._start_flow_run(training)
            if flow_run is None:
                return CANCELLED, "consent withdrawn before it started"
            with get_client(sync_client=True) as client:
                return self._follow(client, UUID(flow_run))

    def _start_flow_run(self, training: Training) -> str | None:
        """A flow run of the `train-user` deployment, recorded on the request; its id, or
        None when the request was cancelled first."""
        from prefect.client.schemas.objects import FlowRun
        from prefect.deployments import run_deployment

        app = self.settings.slack_app
        parameters: dict[str, object] = {"user": training.user_id}
        parameters["workspace"] = training.workspace_id
        if app.train_config:
            parameters["config"] = str(app.train_config)
        if app.train_max_steps:
            parameters["max_steps"] = app.train_max_steps
        if training_cancelled(self.db, training.request_id):
            return None
        run = run_deployment(app.deployment, parameters=parameters, timeout=0)
        # A slot's thread has no event loop, so Prefect runs the sync version: no coroutine.
        assert isinstance(run, FlowRun)
        status = update_training_request(
            self.db, training.request_id, "running", f"Prefect flow run {run.name}", str(run.id)
        )
        if status == CANCELLED:  # the opt-out came while the run was being created
            failed: list[str] = []
            _cancel_flow_runs(self.settings, {training.request_id: str(run.id)}, failed)
            for reason in failed:
                log.warning("training %s: %s", training.request_id, reason)
            return None
        training.requester.notify(
            f"Training queued as Prefect flow run `{run.name}` of `{app.deployment}`. "
            "I will tell you here when it is done."
        )
        return str(run.id)

    def _follow(self, client: object, run_id: UUID) -> tuple[str, str]:
        while True:
            state = client.read_flow_run(run_id).state  # type: ignore[attr-defined]
            if state is not None and state.is_final():
                detail = f"Prefect flow run {state.name.lower()}"
                return ("done" if state.is_completed() else "failed"), (
                    detail + (f": {state.message}" if state.message else "")
                )
            if self._stopping.wait(POLL_SECONDS):
                return QUEUED, (
                    f"the Slack app stopped following Prefect flow run {run_id}, which goes on; "
                    "it reports on it when the app is back"
                )


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


def _tell_cancelled(requester: Requester) -> None:
    requester.notify(f"Training of {requester.label} was cancelled: consent was withdrawn.")


def fair_next(waiting: list[Waiting], served: Mapping[str, int]) -> Waiting:
    """The queued request to start next. One with a Prefect flow run goes first: it runs
    there already, so it takes its slot back. Then the oldest request of the workspace
    served least recently (one never served first, then whichever has waited longest)."""
    resumed = [request for request in waiting if request.flow_run]
    if resumed:
        return resumed[0]
    heads: dict[str, Waiting] = {}
    for request in waiting:  # oldest first
        heads.setdefault(request.workspace_id, request)
    return min(heads.values(), key=lambda head: (served.get(head.workspace_id, -1), head.id))


def bot_client(settings: Settings, db: Database, workspace_id: str) -> WebClient | None:
    """A client with the workspace's bot token, as the Bolt app picks it (OAuth installs
    first), or None when the app holds none for it."""
    if settings.slack_client_id and settings.slack_client_secret:
        client_id, key = settings.slack_client_id, settings.secret_key
        token = installation_token(db.engine, workspace_id, client_id=client_id, secret_key=key)
    else:
        token = settings.slack_bot_token
    return WebClient(token=token, base_url=settings.slack_api_url) if token else None


def direct_messages(client: WebClient, user_id: str) -> Notify:
    """Messages to a person in their DM with the app."""

    def notify(text: str) -> None:
        try:
            client.chat_postMessage(channel=user_id, text=text)
        except SlackApiError as error:
            log.warning("could not message %s: %s", user_id, error)

    return notify


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
