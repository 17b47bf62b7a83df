"""The Slack app's training queue, for real: the real Trainer on a real store, fair between
workspaces, cancellable, and neither losing nor doubling requests across restarts and
replicas. What a training runs is a recorder (or the real `doppel pipeline` child, or a
real Prefect flow run) so that the queue itself is what is tested."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import pytest

from devtools.emulator import EmulatorConfig, create_app
from doppel.config import Settings, get_settings
from doppel.slack.export import read_export
from doppel.store.database import Database
from doppel.store.models import TrainingRequest, utcnow
from serving.slack import training
from serving.slack.state import cancel_training_requests, trainings_since
from serving.slack.training import Trainer, Training
from tests.helpers import TEAM
from tests.slack_world import ALICE, BRUNO, CHIARA, rows, running, wait_for

OTHER = "T0OTHER01"  # a second workspace
BOTH_DBS = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
CANCELLED_NOTE = "was cancelled: consent was withdrawn."


class Recorder:
    """A training that records the order requests start in and, when `held`, waits until
    the test releases it: the queue decides what starts when, this only watches."""

    def __init__(self, held: bool = True) -> None:
        self.started: list[int] = []
        self.held = held
        self._release = threading.Semaphore(0)
        self._lock = threading.Lock()

    def __call__(self, job: Training) -> tuple[str, str]:
        with self._lock:
            self.started.append(job.request_id)
        if self.held and not self._release.acquire(timeout=120):
            return "failed", "the test never released it"
        return "done", f"trained {job.user_id}"

    def run_all(self, count: int) -> list[int]:
        """Let `count` trainings start and finish, one after the other; their start order."""
        for number in range(1, count + 1):
            wait_for(lambda n=number: len(self.started) >= n, 30, f"training {number} to start")
            self._release.release()
        return self.started


def one_slot(slots: int = 1) -> Settings:
    settings = get_settings()
    return settings.model_copy(
        update={"pipeline": settings.pipeline.model_copy(update={"training_slots": slots})}
    )


@contextmanager
def trainer(
    settings: Settings, db: Database, recorder: Recorder | None = None
) -> Iterator[Trainer]:
    queue = Trainer(settings, db, recorder)
    try:
        yield queue
    finally:
        queue.close()


def statuses(db: Database) -> dict[int, str]:
    return {row.id: row.status for row in rows(db, TrainingRequest)}


def test_one_workspace_cannot_starve_another(db: Database) -> None:
    """A queues ten, then B one: B's starts second, not eleventh, then A's go on in order."""
    recorder, told = Recorder(), list[str]()
    with trainer(one_slot(), db, recorder) as queue:
        a = [queue.submit(TEAM, ALICE, "alice", ALICE, told.append) for _ in range(10)]
        (b,) = [queue.submit(OTHER, BRUNO, "bruno", BRUNO, told.append)]
        order = recorder.run_all(11)
        wait_for(lambda: len(told) == 11, 30, "every requester to be told")
    assert order.index(b) < order.index(a[2])
    assert order == [a[0], b, *a[1:]]
    assert set(statuses(db).values()) == {"done"}
    assert told.count(f"Training of bruno finished: trained {BRUNO}") == 1


def test_a_cancelled_queued_request_never_starts(db: Database) -> None:
    """An opt-out in the app (`Trainer.cancel`) and one from the CLI (`cancel_trainings`,
    another process: only the database changes) both keep queued requests from starting,
    and their requesters are told."""
    settings, recorder, told = one_slot(), Recorder(), list[str]()
    with trainer(settings, db, recorder) as queue:
        first = queue.submit(TEAM, BRUNO, "bruno", BRUNO, told.append)
        wait_for(lambda: recorder.started == [first], 30, "the first training to start")
        alice = queue.submit(TEAM, ALICE, "alice", ALICE, told.append)
        alice_elsewhere = queue.submit(OTHER, ALICE, "alice", ALICE, told.append)
        chiara = queue.submit(OTHER, CHIARA, "chiara", CHIARA, told.append)
        last = queue.submit(TEAM, BRUNO, "bruno", BRUNO, told.append)

        failed: list[str] = []
        assert queue.cancel(TEAM, ALICE, failed) == [f"request {alice}"] and not failed
        assert told == [f"Training of alice {CANCELLED_NOTE}"]  # at once, not at its turn
        cancelled = training.cancel_trainings(settings, db, OTHER, ALICE, failed)
        assert cancelled == [f"request {alice_elsewhere}"] and not failed

        order = recorder.run_all(3)
        wait_for(lambda: len(told) == 5, 30, "every requester to be told")
    assert order == [first, chiara, last]
    assert told.count(f"Training of alice {CANCELLED_NOTE}") == 2
    assert statuses(db) == {
        first: "done",
        alice: "cancelled",
        alice_elsewhere: "cancelled",
        chiara: "done",
        last: "done",
    }


@pytest.fixture
def slack(synth_zip: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    """The emulator as Slack and the app's bot token for it, so that a trainer that did
    not take a request can still message whoever asked; yields the emulator's DMs."""
    workspace = read_export(synth_zip, include_private=True, max_bytes=2**26)
    app = create_app(workspace, EmulatorConfig(team_name="synthco"))
    with running(app) as url:
        monkeypatch.setenv("SLACK_API_URL", url + "api/")
        monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-emulator")
        get_settings.cache_clear()
        yield app.state.emulator.conversations


def dms(conversations: dict, user: str) -> list[str]:
    conversation = conversations.get("D" + user[1:])
    return [m["text"] for m in conversation.all_messages()] if conversation else []


def test_a_restart_loses_nothing_and_doubles_nothing(db: Database, slack: dict) -> None:
    """The app stops while `doppel pipeline` runs for alice, with two more queued: the
    running one goes back in the queue, and the next app runs each of the three once,
    fairly, telling the requesters; an app after that runs none of them again."""
    told: list[str] = []
    with trainer(one_slot(), db) as first_app:  # the real runner: a child process
        a1 = first_app.submit(TEAM, ALICE, "alice", ALICE, told.append)
        a2 = first_app.submit(TEAM, BRUNO, "bruno", ALICE, told.append)
        b1 = first_app.submit(OTHER, CHIARA, "chiara", CHIARA, told.append)
        wait_for(lambda: any(t.startswith("Training of alice started") for t in told), 30)
    assert statuses(db) == {a1: "queued", a2: "queued", b1: "queued"}
    assert told[-1].startswith("Training of alice is back in the queue: the Slack app stopped")

    recorder = Recorder(held=False)
    with trainer(one_slot(), db, recorder):
        wait_for(lambda: set(statuses(db).values()) == {"done"}, 30, "the three trainings")
    assert recorder.started == [a1, b1, a2]  # the oldest, then the workspace not yet served
    wait_for(lambda: len(dms(slack, ALICE) + dms(slack, CHIARA)) == 3, 30, "the messages")
    assert dms(slack, ALICE) == [  # from the second app: the first app's requesters are gone
        f"Training of alice finished: trained {ALICE}",
        f"Training of bruno finished: trained {BRUNO}",
    ]
    assert dms(slack, CHIARA) == [f"Training of Chiara Rossi finished: trained {CHIARA}"]

    recorder = Recorder(held=False)
    with trainer(one_slot(), db, recorder) as third_app:
        new = third_app.submit(TEAM, ALICE, "alice", ALICE, told.append)
        wait_for(lambda: statuses(db)[new] == "done", 30, "the new training")
    assert recorder.started == [new]
    with db.session() as session:  # the daily limit counts requests, not attempts
        assert trainings_since(session, TEAM, utcnow() - timedelta(days=1)) == 3
        assert trainings_since(session, OTHER, utcnow() - timedelta(days=1)) == 1


def test_with_oauth_installs_a_requester_is_reached_through_their_workspaces_install(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer that did not take a request reaches its requester with the bot token of
    that workspace's install, and with none where the app is not installed."""
    from cryptography.fernet import Fernet
    from slack_sdk.oauth.installation_store import Installation

    from serving.slack.installations import oauth_stores

    monkeypatch.setenv("SLACK_CLIENT_ID", "111.222")
    monkeypatch.setenv("SLACK_CLIENT_SECRET", "client-secret")
    monkeypatch.setenv("DOPPEL_SECRET_KEY", Fernet.generate_key().decode())
    get_settings.cache_clear()
    settings = get_settings()
    store, _ = oauth_stores(db.engine, "111.222", settings.secret_key)
    installed = {"app_id": "A1", "user_id": BRUNO, "bot_id": "B1", "bot_user_id": "UBOT"}
    store.save(Installation(team_id=OTHER, bot_token="xoxb-other", **installed))
    client = training.bot_client(settings, db, OTHER)
    assert client is not None and client.token == "xoxb-other"
    assert training.bot_client(settings, db, TEAM) is None


@BOTH_DBS
def test_two_replicas_run_each_request_once(db: Database) -> None:
    """Two apps on one store, two slots each, taking requests from both: every request
    runs exactly once, whichever app took it."""
    left, right = Recorder(held=False), Recorder(held=False)
    settings, ignore = one_slot(slots=2), (lambda _text: None)
    with trainer(settings, db, left) as one, trainer(settings, db, right) as two:
        ids = [
            app.submit(workspace, ALICE, "alice", ALICE, ignore)
            for _ in range(6)
            for app, workspace in ((one, TEAM), (two, OTHER))
        ]
        wait_for(lambda: set(statuses(db).values()) == {"done"}, 60, "every training")
    assert sorted(left.started + right.started) == sorted(ids)


@pytest.mark.slow
def test_a_restart_follows_its_prefect_flow_run_again_and_starts_no_other(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With Prefect, an app that stops leaves the flow run to Prefect; the next app follows
    that flow run to its end instead of starting a second one."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Completed
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import user_pipeline_flow

    monkeypatch.setattr(training, "POLL_SECONDS", 0.2)
    told: list[str] = []
    with prefect_test_harness():  # no worker: the flow run waits, Scheduled
        deployment = user_pipeline_flow.to_deployment(name="train-user").apply()
        settings = one_slot().model_copy(update={"prefect_api_url": PREFECT_API_URL.value()})
        with trainer(settings, db) as first_app:
            request = first_app.submit(TEAM, ALICE, "alice", ALICE, told.append)
            wait_for(lambda: rows(db, TrainingRequest)[0].flow_run, 60, "the flow run")
        (row,) = rows(db, TrainingRequest)
        assert row.status == "queued" and "stopped following Prefect flow run" in told[-1]

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(row.flow_run), Completed(), force=True)
            with trainer(settings, db):
                wait_for(lambda: statuses(db)[request] == "done", 60, "the followed run")
            runs = client.read_flow_runs()
    assert [str(run.id) for run in runs if run.deployment_id == deployment] == [row.flow_run]
    (row,) = rows(db, TrainingRequest)
    assert row.detail == "Prefect flow run completed"
    assert cancel_training_requests(db, TEAM, ALICE) == {}
