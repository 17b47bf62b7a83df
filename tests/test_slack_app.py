"""The Slack app for real: signed HTTP requests to the app under uvicorn, Bolt and
slack-sdk unchanged, the Slack emulator as Slack, and a real store (SQLite and
PostgreSQL) and MLflow registry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit
from uuid import UUID

import pytest
import uvicorn
import yaml
from cryptography.fernet import Fernet
from datasets import load_from_disk
from slack_sdk import WebClient
from sqlalchemy import text

from devtools.emulator import Emulator, EmulatorConfig, create_app, serve_in_thread
from devtools.synth import generate_workspace, write_export
from doppel.config import get_settings
from doppel.consent import grant
from doppel.dataset.build import build_dataset
from doppel.dataset.live import thread_prompt
from doppel.dataset.samples import SampleRules
from doppel.ingest import ingest_export
from doppel.registry import Registry, model_name
from doppel.slack.export import read_export
from doppel.store.database import Database
from doppel.store.lookup import people
from doppel.store.models import Enrollment, SlackEvent, TrainingRequest
from serving.slack.state import WORKSPACE_WIDE, set_limits, set_persona
from tests.helpers import REPO, TEAM, TINY
from tests.servers import free_port
from tests.slack_world import (
    ALICE,
    BOT_USER,
    BRUNO,
    CHIARA,
    GENERAL,
    SlackWorld,
    a_thread,
    rows,
    signed,
    slack_world,
    wait_for,
)

BOTH_DBS = pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def world(db: Database, synth_zip: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlackWorld]:
    ingest_export(db, synth_zip, max_bytes=2**26)
    with slack_world(monkeypatch, synth_zip) as slack:
        yield slack


# -- the prompt: live threads render exactly as training samples ------------------------


def test_live_conversations_render_like_training_samples(db: Database, synth_zip: Path) -> None:
    from serving.slack.mentions import channel_messages, thread_messages

    ingest_export(db, synth_zip, max_bytes=2**26)
    settings = get_settings()
    built = build_dataset(settings, ALICE)
    samples = load_from_disk(str(built.path))["train"]
    workspace = read_export(synth_zip, include_private=True, max_bytes=2**26)
    with db.session() as session:
        known = people(session, TEAM)
    names = {uid: person.label for uid, person in known.items()}
    bots = {uid for uid, person in known.items() if person.is_bot}
    channels = {channel["id"]: channel["name"] for channel in workspace.channels}
    rules = SampleRules.from_settings(settings.dataset)
    checked = {"thread": 0, "channel": 0}
    with serve_in_thread(create_app(workspace)) as api_url:
        client = WebClient(token="xoxb-emulator", base_url=api_url)
        emulator_state = Emulator(workspace, EmulatorConfig())
        for sample in samples:
            channel, root = sample["conversation_id"].split(":")
            conversation = emulator_state.conversations[channel]
            threaded = root in conversation.threads
            kind = "thread" if threaded else "channel"
            if checked[kind] >= 5:
                continue
            if threaded:
                earlier = [conversation.by_ts[root], *conversation.threads[root]]
            else:
                earlier = [m for m in conversation.timeline if not m.get("reply_count")]
                earlier = [m for m in earlier if m.get("thread_ts") in (None, m["ts"])]
            until = max((m["ts"] for m in earlier if m["ts"] < sample["reply_ts"]), key=float)
            messages = (
                thread_messages(client, channel, root, until)
                if threaded
                else channel_messages(client, channel, until, limit=200)
            )
            chat = thread_prompt(
                channel,
                messages,
                ALICE,
                names,
                channels,
                bots=bots,
                rules=rules,
                gap_minutes=settings.dataset.gap_minutes,
            )
            assert chat == sample["messages"][1:-1], sample["conversation_id"]
            checked[kind] += 1
    assert checked == {"thread": 5, "channel": 5}


# -- requests: signatures, url_verification, acks and retries ---------------------------


def test_url_verification_and_bad_or_stale_signatures(world: SlackWorld, db: Database) -> None:
    challenge = json.dumps({"token": "x", "challenge": "c-123", "type": "url_verification"})
    answer = world.post(challenge, "application/json", signed(challenge))
    assert answer.status_code == 200 and answer.json() == {"challenge": "c-123"}

    form = {"team_id": TEAM, "user_id": ALICE, "command": "/doppel", "text": "optin"}
    optin = urlencode(form | {"channel_id": GENERAL, "response_url": world.emulator_url + "x"})
    stale = int(time.time()) - 6 * 60  # Slack's window is 5 minutes
    for headers in (
        signed(optin, secret="not-the-signing-secret"),
        signed(optin, timestamp=stale),
        {},
    ):
        assert world.post(optin, "application/x-www-form-urlencoded", headers).status_code == 401
    root = a_thread(world)
    ts = world.say(BRUNO, f"<@{BOT_USER}> hello?", root)
    event = {"type": "app_mention", "user": BRUNO, "text": f"<@{BOT_USER}> hello?", "ts": ts,
             "thread_ts": root, "channel": GENERAL, "event_ts": ts}  # fmt: skip
    body = json.dumps({"type": "event_callback", "team_id": TEAM, "event_id": "EvBAD",
                       "event": event})  # fmt: skip
    assert world.post(body, "application/json", signed(body, secret="wrong")).status_code == 401
    tampered = signed(body)
    assert (
        world.post(body.replace("hello", "hullo"), "application/json", tampered).status_code == 401
    )

    time.sleep(1)  # anything wrongly accepted would have run by now
    assert rows(db, Enrollment) == [] and rows(db, SlackEvent) == []
    assert world.bot_replies(root) == [] and world.emulator.responses == {}
    methods = {entry.method for entry in world.emulator.request_log}
    assert methods <= {"auth.test"}  # only the app's start-up check reached Slack


@BOTH_DBS
def test_a_mention_is_acked_at_once_and_retries_get_exactly_one_reply(
    db: Database, synth_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_export(db, synth_zip, max_bytes=2**26)
    with db.transaction() as session:
        grant(session, TEAM, ALICE, "test")
    with slack_world(monkeypatch, synth_zip, latency=0.3) as world:  # Slack answers slowly
        root = a_thread(world)
        started = time.monotonic()
        event, first = world.mention(BRUNO, "what do you think about the launch?", "Ev0001", root)
        acked = time.monotonic() - started
        assert first.status_code == 200 and acked < 3
        assert world.bot_replies(root) == []  # acked before any work was done
        for retry in (1, 2):  # Slack resends the same envelope
            again = world.event(event, "Ev0001", retry=retry)
            assert again.status_code == 200
        (reply,) = wait_for(
            lambda: [m for m in world.bot_replies(root) if "edited" in m], 30, "the reply"
        )
        time.sleep(2)  # a second reply, if any, would be posted by now
        assert len(world.bot_replies(root)) == 1
    assert [row.event_id for row in rows(db, SlackEvent)] == ["Ev0001"]
    avatar = next(u for u in read_export(synth_zip, max_bytes=2**26).users if u["id"] == ALICE)
    assert reply["username"] == "alice (DoppelBot)" and reply["bot_id"]
    assert reply["icons"] == {"image_72": avatar["profile"]["image_192"]}
    # The placeholder was replaced: no model API listens, so the reply apologises, and the
    # details (the model API's address among them) go to the log only.
    assert reply["text"].startswith("Sorry, something went wrong; an admin can find details")
    assert "Written by DoppelBot in alice's style" in json.dumps(reply["blocks"])
    methods = [entry.method for entry in world.emulator.request_log]
    assert methods.count("chat.postMessage") == 1 and methods.count("chat.update") == 1


# -- /doppel --------------------------------------------------------------------------------


def make_admin(world: SlackWorld, user_id: str) -> None:
    """Make someone a workspace admin, as Slack's users.info will then say."""
    next(user for user in world.emulator.users if user["id"] == user_id)["is_admin"] = True


def register_version(team: str, user: str) -> tuple[str, Path]:
    """A registered, promoted version backed by a real MLflow run with an adapter artifact;
    returns the run id and its artifact folder."""
    import mlflow

    registry = Registry(get_settings())
    with mlflow.start_run(experiment_id=registry.experiment_id(team)) as run:
        mlflow.log_text('{"r": 8}', "adapter/adapter_config.json")
    version = registry.register(team, user, run.info.run_id, {"train_samples": "10"})
    registry.promote(model_name(team, user), version, "by the test")
    return run.info.run_id, Path(urlsplit(run.info.artifact_uri).path)


@BOTH_DBS
def test_doppel_subcommands(world: SlackWorld, db: Database) -> None:
    assert "`/doppel optin`" in world.command("help") == world.command("")
    assert "Unknown subcommand `dance`" in world.command("dance")
    assert "Nobody here has opted in yet" in world.command("list")

    assert world.command("optin").startswith("You opted in")
    assert world.command("optin").startswith("You had already opted in")
    (row,) = rows(db, Enrollment)
    assert (row.workspace_id, row.user_id, row.granted, row.changed_by) == (
        TEAM, ALICE, True, ALICE,
    )  # fmt: skip
    assert "• alice <@U0000001> (answers here: the only one enrolled)" in world.command("list")

    assert "alice now answers mentions in this channel" in world.command(f"switch <@{ALICE}|alice>")
    assert "has not opted in" in world.command("switch chiara.rossi")  # names work too
    assert "unknown user 'nobody'" in world.command("switch nobody")
    assert "only workspace admins" in world.command(f"switch <@{ALICE}> workspace", user=BRUNO)
    make_admin(world, BRUNO)
    assert "everywhere in this workspace" in world.command(
        f"switch <@{ALICE}> workspace", user=BRUNO
    )
    listing = world.command("list")
    assert "(answers in this channel, workspace default)" in listing

    assert "only workspace admins can train someone else" in world.command(
        f"train <@{ALICE}>", user=CHIARA
    )
    assert "Chiara Rossi has not opted in" in world.command(f"train <@{CHIARA}>", user=BRUNO)
    with db.transaction() as session:
        set_limits(session, TEAM, trainings_per_day=0)
    assert "used its 0 trainings of the last 24 hours" in world.command("train")
    assert rows(db, TrainingRequest) == []

    status = world.command("status")
    assert "*Latest trainings*\n• none yet" in status and "*In production*\n• nobody yet" in status

    with db.transaction() as session:
        set_limits(session, TEAM, max_enrolled=1)
    assert "already has its limit of 1 enrolled people" in world.command("optin", user=BRUNO)

    assert world.command("optout").startswith("You opted out")
    assert "Nobody here has opted in yet" in world.command("list")


def test_optout_deletes_datasets_adapters_and_versions(world: SlackWorld, db: Database) -> None:
    settings = get_settings()
    world.command("optin")
    world.command(f"switch <@{ALICE}>")
    dataset = build_dataset(settings, ALICE).path
    checkpoint = settings.run_dir(TEAM, ALICE, "0123abcd") / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    run_id, artifacts = register_version(TEAM, ALICE)
    assert artifacts.joinpath("adapter", "adapter_config.json").exists()

    answer = world.command("optout")
    assert answer.splitlines() == [
        "You opted out: DoppelBot will not train on you or answer as you. Deleted:",
        "• datasets deleted: 1",
        "• training run folders deleted: 1",
        f"• registry versions deleted: 1 (model {model_name(TEAM, ALICE)})",
        "• adapters deleted (MLflow runs and their artifacts): 1",
        f"• active persona cleared in: {GENERAL}",
        f"• stored messages now left out of every dataset: {alice_messages(db)}",
    ]
    registry = Registry(settings)
    assert not dataset.exists() and not checkpoint.parent.parent.exists()
    assert registry.versions(model_name(TEAM, ALICE)) == []
    assert registry.models(TEAM) == [] and not artifacts.exists()
    assert registry.client.get_run(run_id).info.lifecycle_stage == "deleted"
    (row,) = rows(db, Enrollment)
    assert row.granted is False

    # Her messages are gone from everyone's datasets, context included.
    bruno = build_dataset(settings, BRUNO)
    assert bruno.stats["dropped_workspace_messages"]["opted_out"] == alice_messages(db)
    contexts = load_from_disk(str(bruno.path))["train"]["messages"]
    assert not any(m["content"].startswith("alice: ") for chat in contexts for m in chat)

    assert "alice has not opted in" in world.command("train")
    root = a_thread(world)
    world.mention(BRUNO, "alice, are you there?", "Ev0002", root)
    (reply,) = wait_for(lambda: world.bot_replies(root), 30, "the reply")
    assert reply["text"].startswith("Nobody answers mentions here yet")
    assert "You opted out" in world.command("optout")  # again: nothing left, no error


def alice_messages(db: Database) -> int:
    with db.session() as session:
        return len(session.execute(text(
            f"SELECT ts FROM messages WHERE workspace_id = '{TEAM}' AND user_id = '{ALICE}'"
        )).all())  # fmt: skip


# -- many workspaces: OAuth, encrypted tokens, isolation ---------------------------------


@BOTH_DBS
def test_oauth_install_then_that_workspace_is_served(
    db: Database, synth_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_export(db, synth_zip, max_bytes=2**26)
    key = Fernet.generate_key().decode()
    redirect = "https://doppel.example.com/slack/oauth_redirect"  # the app's public URL
    oauth = {
        "SLACK_BOT_TOKEN": None,
        "SLACK_CLIENT_ID": "emulator-client-id",
        "SLACK_CLIENT_SECRET": "emulator-client-secret",
        "DOPPEL_SECRET_KEY": key,
        "DOPPEL_SLACK_APP__REDIRECT_URI": redirect,
        "DOPPEL_SLACK_APP__AUTHORIZATION_URL": "{emulator}emulator/oauth/authorize",
    }
    with slack_world(monkeypatch, synth_zip, **oauth) as world:
        # The admin opens /slack/install and is sent to Slack's consent screen.
        install = world.http.get(world.app_url + "slack/install")
        assert install.status_code == 302
        consent_screen = install.headers["location"]
        assert consent_screen.startswith(world.emulator_url + "emulator/oauth/authorize?")
        query = parse_qs(urlsplit(consent_screen).query)
        assert query["redirect_uri"] == [redirect]
        assert {"app_mentions:read", "chat:write.customize", "commands"} <= set(
            query["scope"][0].split(",")
        )
        cookie = install.headers["set-cookie"].split(";")[0]  # the browser keeps the state
        # "Allow" sends the browser back to the redirect URL with a code.
        allowed = world.http.get(consent_screen)
        back = urlsplit(allowed.headers["location"])
        assert allowed.status_code == 302 and f"https://{back.netloc}{back.path}" == redirect
        callback = f"{world.app_url}slack/oauth_redirect?{back.query}"
        done = world.http.get(callback, headers={"Cookie": cookie})
        assert done.status_code == 200, done.text
        replayed = world.http.get(callback, headers={"Cookie": cookie})
        assert replayed.status_code != 200  # the state is single-use
        exchanges = [e.method for e in world.emulator.request_log if e.method.startswith("oauth")]
        assert exchanges == ["oauth.v2.access"]

        # Tokens are stored encrypted, and decrypt to the token Slack issued.
        with db.session() as session:
            stored = session.execute(text("SELECT bot_token FROM slack_bots")).scalars().all()
            installs = session.execute(text("SELECT team_id FROM slack_installations")).all()
        (ciphertext,) = stored
        assert not ciphertext.startswith("xox") and installs == [(TEAM,)]
        token = Fernet(key.encode()).decrypt(ciphertext.encode()).decode()
        assert token.startswith("xoxb-") and token in world.emulator.tokens - {"xoxb-emulator"}

        # The installed workspace is served with its token...
        assert world.command("optin").startswith("You opted in")
        root = a_thread(world)
        world.mention(BRUNO, "hello?", "Ev0003", root)
        (reply,) = wait_for(lambda: [m for m in world.bot_replies(root) if "edited" in m])
        assert reply["username"] == "alice (DoppelBot)"
        # ...and a workspace that never installed the app gets nothing done.
        refused = world.command("optin", user=BRUNO, team="T0OTHER1")
        assert "installation" in refused and "opted in" not in refused
    assert [(r.workspace_id, r.user_id) for r in rows(db, Enrollment)] == [(TEAM, ALICE)]


def test_a_workspace_reaches_only_its_own_personas_and_data(
    db: Database, synth_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other_team = "T0OTHER1"  # the same user ids as TEAM: U0000001, U0000002, ...
    other = write_export(
        generate_workspace(users=4, days=5, seed=3, workspace_id=other_team), tmp_path / "other.zip"
    )
    ingest_export(db, synth_zip, max_bytes=2**26)
    ingest_export(db, other, max_bytes=2**26)
    with db.transaction() as session:
        grant(session, other_team, BRUNO, "test")
        set_persona(session, other_team, WORKSPACE_WIDE, BRUNO, "test")
    register_version(other_team, BRUNO)
    with slack_world(monkeypatch, synth_zip) as world:
        make_admin(world, CHIARA)
        assert "Nobody here has opted in yet" in world.command("list")
        assert "bruno has not opted in" in world.command(f"switch <@{BRUNO}>", user=CHIARA)
        assert "bruno has not opted in" in world.command(f"train <@{BRUNO}>", user=CHIARA)
        assert "*In production*\n• nobody yet" in world.command("status")
        root = a_thread(world)
        world.mention(ALICE, "bruno, thoughts?", "Ev0004", root)
        (reply,) = wait_for(lambda: world.bot_replies(root), 30, "the reply")
        assert reply["text"].startswith("Nobody answers mentions here yet")

        # Requests that name the other workspace are never served with this one's token.
        ts = world.say(ALICE, f"<@{BOT_USER}> as the other workspace")
        event = {"type": "app_mention", "user": ALICE, "text": "x", "ts": ts,
                 "channel": GENERAL, "event_ts": ts}  # fmt: skip
        assert world.event(event, "Ev0005", team=other_team).status_code == 200
        key = world.send_command("optin", user=ALICE, team=other_team)
        time.sleep(1.5)
        assert world.bot_replies(ts) == [] and key not in world.emulator.responses
        assert "You opted out" in world.command("optout", user=BRUNO)

    assert [row.event_id for row in rows(db, SlackEvent)] == ["Ev0004"]
    enrolled = {(r.workspace_id, r.user_id): r.granted for r in rows(db, Enrollment)}
    assert enrolled == {(other_team, BRUNO): True, (TEAM, BRUNO): False}
    models = Registry(get_settings()).models(other_team)
    assert [(m["user_id"], m["production"]) for m in models] == [(BRUNO, 1)]


# -- training from Slack, and a real reply from the model API ----------------------------


@contextmanager
def serving_on(app: Any, port: int) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn on a given port (lifespan included)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 300, "the server to start")
    assert thread.is_alive(), "the server failed to start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_train_from_slack_then_a_real_reply_in_the_thread(
    settings, db: Database, synth_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.api import create_app as model_api

    recipe = tmp_path / "tiny.yaml"
    fast_eval = {"max_generations": 2, "max_new_tokens": 16}
    recipe.write_text(yaml.safe_dump(TINY | {"max_steps": 4, "eval_steps": 2, "eval": fast_eval}))
    ingest_export(db, synth_zip, max_bytes=2**26)
    model_port = free_port()
    env = {
        "DOPPEL_SERVING_URL": f"http://127.0.0.1:{model_port}",
        "DOPPEL_SLACK_APP__TRAIN_CONFIG": str(recipe),
        "DOPPEL_SLACK_APP__MAX_TOKENS": "24",  # CPU generation: keep replies short
        "DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE": "6000",  # the pipeline ingests the emulator
        "DOPPEL_SLACK__RATES__LISTS_PER_MINUTE": "6000",
    }
    with slack_world(monkeypatch, synth_zip, **env) as world:
        assert world.command("optin").startswith("You opted in")
        assert "Training of alice is queued (request 1)" in world.command("train")
        finished = wait_for(
            lambda: [m for m in world.dms(ALICE) if m.startswith("Training of alice finished")],
            1200,
            "the training to finish",
        )
        started, *_ = world.dms(ALICE)
        assert started.startswith("Training of alice started: dataset, training, evaluation")
        assert "version 1 promoted (validation loss" in finished[0], world.dms(ALICE)
        status = world.command("status")
        assert "alice: done, version 1 promoted" in status
        assert "*In production*\n• alice: version 1, validation loss" in status
        (request,) = rows(db, TrainingRequest)
        assert (request.user_id, request.requested_by, request.status) == (ALICE, ALICE, "done")

        with serving_on(model_api(get_settings(), "transformers"), model_port):
            root = a_thread(world)
            world.mention(BRUNO, "what do you make of the rollout plan?", "Ev0006", root)
            (reply,) = wait_for(
                lambda: [m for m in world.bot_replies(root) if "edited" in m], 300, "the reply"
            )
            # No production adapter: the model API's 404 becomes a clear answer.
            world.command("optin", user=BRUNO)
            world.command(f"switch <@{BRUNO}>", user=BRUNO)
            world.mention(ALICE, "bruno?", "Ev0007", root)
            untrained = wait_for(
                lambda: [
                    m
                    for m in world.bot_replies(root)
                    if m.get("username") == "bruno (DoppelBot)" and "edited" in m
                ],
                300,
                "bruno's answer",
            )
    assert reply["username"] == "alice (DoppelBot)" and reply["text"].strip()
    assert not reply["text"].startswith(("Sorry", "_alice is typing")), reply["text"]
    (answer,) = untrained
    assert answer["text"].startswith("bruno has no trained voice yet"), answer["text"]


def test_train_runs_the_prefect_deployment_when_prefect_is_configured(
    db: Database, synth_zip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import user_pipeline_flow

    ingest_export(db, synth_zip, max_bytes=2**26)
    with prefect_test_harness():
        api_url = PREFECT_API_URL.value()
        user_pipeline_flow.to_deployment(name="train-user").apply()
        with slack_world(monkeypatch, synth_zip, PREFECT_API_URL=api_url) as world:
            world.command("optin")
            assert "is queued" in world.command("train")
            (queued,) = wait_for(lambda: world.dms(ALICE), 60, "the flow run")
            assert queued.startswith("Training queued as Prefect flow run `")
            (request,) = wait_for(lambda: [r for r in rows(db, TrainingRequest) if r.flow_run])
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(UUID(request.flow_run))
            assert run.parameters == {"user": ALICE, "workspace": TEAM}
            assert request.status == "running" and run.name in request.detail


def test_the_manifest_matches_the_app() -> None:

    manifest = yaml.safe_load((REPO / "slack" / "manifest.yaml").read_text())
    assert manifest["oauth_config"]["scopes"]["bot"] == get_settings().slack_app.scopes
    assert "chat:write.customize" in manifest["oauth_config"]["scopes"]["bot"]
    settings = manifest["settings"]
    events = ["app_mention", "app_uninstalled", "tokens_revoked"]
    assert settings["event_subscriptions"]["bot_events"] == events
    (command,) = manifest["features"]["slash_commands"]
    assert command["command"] == "/doppel" and command["should_escape"] is True
    urls = [
        command["url"],
        settings["event_subscriptions"]["request_url"],
        settings["interactivity"]["request_url"],
    ]
    assert {urlsplit(url).path for url in urls} == {"/slack/events"}
    (redirect,) = manifest["oauth_config"]["redirect_urls"]
    assert urlsplit(redirect).path == "/slack/oauth_redirect"
