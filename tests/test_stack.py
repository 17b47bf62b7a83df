"""The production topology for real: `scripts/stack.sh up` starts PostgreSQL, MLflow, the
Prefect server and a worker, two `doppel serve` replicas and `doppel slack-app`, with the
Slack emulator as Slack, each its own process on 127.0.0.1; the test drives it over HTTP
as its users would, from an ingested workspace to a revoke, then `down` stops it all."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
import yaml
from slack_sdk import WebClient
from sqlalchemy import select

from devtools.postgres import server_bin
from doppel.errors import DoppelError
from doppel.store.database import Database
from doppel.store.models import Enrollment
from serving.slack.model_client import ModelClient
from tests.helpers import REPO, TEAM, TINY, doppel, last_json, skip_or_fail
from tests.servers import free_port
from tests.slack_world import BOT_USER, GENERAL, signed, wait_for

# 10.5 minutes measured on 2 cores that other work kept busy (load 6-9); every wait is bounded.
pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(1200)]

STACK = REPO / "scripts" / "stack.sh"
PERSONA = "U0000004"  # dev.patel; the emulator's user token speaks as alice (U0000001)
QUESTION = [{"role": "user", "content": "Bo: is the deploy going out today?"}]
CHATS = 'doppel_requests_total{route="/v1/chat/completions",status="200"}'


@dataclass
class Stack:
    """A running stack: its folder and the settings it wrote (stack.env)."""

    root: Path
    caller: dict[str, str]  # the environment `stack.sh` runs in: ports, recipe, limits
    env: dict[str, str] = field(default_factory=dict)  # what `up` wrote to stack.env

    @property
    def replicas(self) -> list[str]:
        return self.env["DOPPEL_SERVING_URL"].split(",")

    @property
    def slack_app(self) -> str:
        return f"http://127.0.0.1:{self.env['DOPPEL_STACK_SLACK_APP_PORT']}"

    @property
    def emulator(self) -> str:
        return self.env["SLACK_API_URL"].removesuffix("api/")

    @property
    def client(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['DOPPEL_SERVE__API_KEYS'].split(',')[0]}"}

    def script(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """`scripts/stack.sh COMMAND`, its output kept for the failure message."""
        return subprocess.run(
            ["bash", str(STACK), command],
            cwd=REPO,
            env=self.caller,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def doppel(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        """The CLI as an operator runs it against the stack (`eval "$(stack.sh env)"`)."""
        return doppel(*args, env=self.env, ok=ok)

    def chat(self, replica: str, max_tokens: int = 8) -> httpx.Response:
        body = {"model": f"{TEAM}/{PERSONA}", "messages": QUESTION, "max_tokens": max_tokens}
        return httpx.post(
            f"{replica}/v1/chat/completions", json=body, headers=self.client, timeout=120
        )

    def served_version(self, replica: str) -> str | None:
        models = httpx.get(f"{replica}/v1/models", headers=self.client, timeout=10).json()
        return next((m["version"] for m in models["data"] if m["id"] == f"{TEAM}/{PERSONA}"), None)

    def chats_answered(self, replica: str) -> float:
        metrics = httpx.get(f"{replica}/metrics", headers=self.client, timeout=10).text
        found = re.search(rf"^{re.escape(CHATS)} (\S+)$", metrics, re.MULTILINE)
        return float(found.group(1)) if found else 0.0


def read_settings(path: Path) -> dict[str, str]:
    """stack.env: NAME='value' lines, as the shell reads them."""
    pairs = (shlex.split(line)[0] for line in path.read_text().splitlines() if line.strip())
    return dict(pair.split("=", 1) for pair in pairs)


@pytest.fixture(scope="module")
def stack(models_dir: Path, synth_zip: Path) -> Iterator[Stack]:
    try:
        server_bin()
    except DoppelError as error:
        skip_or_fail(f"the stack needs PostgreSQL: {error.message}")
    # Under /tmp, not pytest's tmp: the postgres user must reach the cluster's folder.
    root = Path(tempfile.mkdtemp(prefix="doppel-stack-"))
    root.chmod(0o755)
    ports = {
        f"DOPPEL_STACK_{part}_PORT": str(free_port())
        for part in ("POSTGRES", "MLFLOW", "PREFECT", "EMULATOR", "SLACK_APP")
    }
    caller = {k: v for k, v in os.environ.items() if not k.startswith(("DOPPEL_", "MLFLOW_"))}
    running = Stack(
        root,
        caller
        | ports
        | {
            "DOPPEL_STACK_DIR": str(root),
            "DOPPEL_STACK_SERVE_PORTS": f"{free_port()},{free_port()}",
            "DOPPEL_STACK_EXPORT": str(synth_zip),
            "DOPPEL_STACK_BIN": str(Path(sys.executable).parent),
            "DOPPEL_STACK_WAIT_SECONDS": "240",
            "DOPPEL_MODEL_CACHE": str(models_dir),
            "DOPPEL_SERVE__ENGINE": "transformers",  # two vLLM engines would not fit 2 cores
            "DOPPEL_SERVE__REFRESH_SECONDS": "1",
            # The emulator is local: the worker's ingest may go faster than Slack's tiers.
            "DOPPEL_SLACK__RATES__LISTS_PER_MINUTE": "6000",
            "DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE": "6000",
        },
    )
    try:
        up = running.script("up", timeout=480)
        assert up.returncode == 0, up.stdout + up.stderr
        running.env = read_settings(root / "stack.env")
        yield running
    finally:
        try:
            down = running.script("down", timeout=240)
            print(down.stdout, down.stderr)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def test_the_stack_trains_serves_answers_and_forgets(stack: Stack) -> None:
    timings: dict[str, float] = {}
    began = time.monotonic()

    # 1. A workspace, ingested into the stack's PostgreSQL; one person consents.
    ingested = last_json(
        stack.doppel("ingest", "export", stack.env["DOPPEL_STACK_EXPORT"], "--json")
    )
    assert ingested["workspace"] == TEAM
    stack.doppel("consent", "grant", PERSONA, "--workspace", TEAM)

    # 2. The `train-user` deployment, run through Prefect's API as the UI runs it.
    recipe = stack.root / "tiny.yaml"
    tiny = TINY | {"max_steps": 2, "eval_steps": 2}
    recipe.write_text(yaml.safe_dump(tiny | {"eval": {"max_generations": 1, "max_new_tokens": 8}}))
    prefect = httpx.Client(base_url=stack.env["PREFECT_API_URL"], timeout=30)
    deployment = prefect.get("/deployments/name/user-pipeline/train-user").json()
    parameters = {"user": PERSONA, "workspace": TEAM, "config": str(recipe)}
    run = prefect.post(
        f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters}
    ).json()

    # 3. The worker runs it to its end.
    def finished() -> dict | None:
        state = prefect.get(f"/flow_runs/{run['id']}").json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    state = wait_for(finished, 420, "the train-user flow run")
    assert state["type"] == "COMPLETED", (state, tail(stack.root / "logs" / "worker.log"))
    (model,) = last_json(stack.doppel("models", "--json"))
    assert model["production"] == 1, model  # the gate promoted it
    timings["train-user"] = time.monotonic() - began

    # 4. Both replicas serve it, and the client spreads over them, past a dead one.
    for replica in stack.replicas:
        wait_for(lambda r=replica: stack.served_version(r) == "1", 60, f"version 1 on {replica}")
        answer = stack.chat(replica)
        assert answer.status_code == 200, answer.text
        assert answer.json()["system_fingerprint"] == f"doppel.{TEAM}.{PERSONA}@1"
    before = [stack.chats_answered(replica) for replica in stack.replicas]
    dead = f"http://127.0.0.1:{free_port()}"
    spread = ModelClient(
        ",".join([dead, *stack.replicas]), max_tokens=4, api_key=stack.client["Authorization"][7:]
    )
    assert all(spread.reply(TEAM, PERSONA, QUESTION) for _ in range(4))
    spread.close()
    after = [stack.chats_answered(replica) for replica in stack.replicas]
    assert sum(after) - sum(before) == 4 and all(a > b for a, b in zip(after, before, strict=True))
    health = httpx.get(f"{stack.slack_app}/healthz", timeout=10).json()
    assert health["model_api"] == ", ".join(stack.replicas)
    timings["served"] = time.monotonic() - began

    # 5. In #general, alice switches the persona on, then mentions the bot; Slack delivers
    # the event twice (a retry), and exactly one reply is posted.
    secret = stack.env["SLACK_SIGNING_SECRET"]
    key = f"switch-{time.monotonic_ns()}"
    command = {
        "team_id": TEAM,
        "channel_id": GENERAL,
        "user_id": "U0000001",
        "command": "/doppel",
        "text": f"switch <@{PERSONA}>",
        "api_app_id": "AEMULATOR",
        "response_url": f"{stack.emulator}emulator/responses/{key}",
        "trigger_id": "13345224609.738474920.8088930838d88f008e0",
    }
    body = urlencode(command)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    acked = httpx.post(
        f"{stack.slack_app}/slack/events", content=body, headers=form | signed(body, secret)
    )
    assert acked.status_code == 200, acked.text
    (switched,) = wait_for(
        lambda: httpx.get(f"{stack.emulator}emulator/responses/{key}").json(), 60, "the switch"
    )
    assert "now answers mentions in this channel" in switched["text"], switched

    alice = WebClient(token="xoxp-emulator", base_url=stack.env["SLACK_API_URL"])
    text = f"<@{BOT_USER}> is the deploy going out today?"
    asked = alice.chat_postMessage(channel=GENERAL, text=text)
    logged = len(httpx.get(f"{stack.emulator}emulator/requests").json())
    event = {
        "type": "app_mention",
        "user": alice.auth_test()["user_id"],
        "text": text,
        "ts": asked["ts"],
        "channel": GENERAL,
        "event_ts": asked["ts"],
    }
    envelope = json.dumps(
        {
            "type": "event_callback",
            "team_id": TEAM,
            "api_app_id": "AEMULATOR",
            "event": event,
            "event_id": "EvStackMention1",
            "event_time": int(time.time()),
            "authorizations": [{"team_id": TEAM, "user_id": BOT_USER, "is_bot": True}],
        }
    )
    retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
    for extra in ({}, retry):
        headers = {"Content-Type": "application/json"} | signed(envelope, secret) | extra
        delivered = httpx.post(f"{stack.slack_app}/slack/events", content=envelope, headers=headers)
        assert delivered.status_code == 200, delivered.text

    def replies() -> list[dict]:
        messages = httpx.get(f"{stack.emulator}emulator/messages/{GENERAL}").json()
        return [m for m in messages if m.get("thread_ts") == asked["ts"] and m.get("bot_id")]

    wait_for(lambda: any("edited" in m for m in replies()), 180, "the reply in the thread")
    time.sleep(2)  # a second reply, if any, would be posted by now
    (reply,) = replies()
    assert not reply["text"].startswith("Sorry"), reply["text"]
    calls = [e["method"] for e in httpx.get(f"{stack.emulator}emulator/requests").json()[logged:]]
    assert (calls.count("chat.postMessage"), calls.count("chat.update")) == (1, 1), calls
    timings["answered"] = time.monotonic() - began

    # 6. A revoke stops both replicas at once: no request begun 2 s after it is answered.
    # Each replica is asked again and again; a request's start time is what counts, since
    # an answered one spends most of its time generating.
    revoke = subprocess.Popen(
        [sys.executable, "-m", "doppel.cli", "consent", "revoke", PERSONA, "--workspace", TEAM],
        cwd=REPO,
        env=os.environ | stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    refused: set[str] = set()
    last_answered = dict.fromkeys(stack.replicas, 0.0)  # when the last 200 was asked for
    deadline = time.monotonic() + 180
    while len(refused) < len(stack.replicas) and time.monotonic() < deadline:
        for replica in set(stack.replicas) - refused:
            asked = time.time()
            if stack.chat(replica, max_tokens=1).status_code == 404:
                refused.add(replica)
            else:
                last_answered[replica] = asked
    output, _ = revoke.communicate(timeout=180)
    assert revoke.returncode == 0, output
    database = Database(stack.env["DATABASE_URL"])
    with database.session() as session:
        consent = session.scalars(select(Enrollment).where(Enrollment.user_id == PERSONA)).one()
    database.dispose()
    assert not consent.granted
    withdrawn = consent.changed_at.timestamp()
    assert refused == set(stack.replicas)
    lags = {replica: asked - withdrawn for replica, asked in last_answered.items()}
    assert all(lag <= 2.0 for lag in lags.values()), lags
    for replica in stack.replicas:
        assert stack.chat(replica).json()["error"]["type"] == "model_not_found"
    timings["revoked"] = time.monotonic() - began

    # `up` again: every part is left running as it is.
    again = stack.script("up", timeout=240)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 7, again.stdout
    print("stack timings (s from the first step):", {k: round(v) for k, v in timings.items()})
    print("last answered request, s after the revoke:", {k: round(v, 2) for k, v in lags.items()})


def test_down_stops_what_up_started_and_nothing_else(stack: Stack) -> None:
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    pids = {
        path.stem: int(path.read_text().split()[0]) for path in (stack.root / "run").glob("*.pid")
    }
    assert set(pids) == {
        "emulator", "mlflow", "prefect", "worker", "serve-1", "serve-2", "slack-app"
    }  # fmt: skip
    try:
        down = stack.script("down", timeout=240)
        assert down.returncode == 0, down.stdout + down.stderr
        for part, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{part} (pid {pid}) still runs"
        assert not list((stack.root / "run").glob("*.pid"))
        assert bystander.poll() is None  # not ours: left alone
        status = stack.script("status", timeout=60).stdout
        assert "running" not in status, status
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{stack.slack_app}/healthz", timeout=2)
    finally:
        os.kill(bystander.pid, signal.SIGTERM)
        bystander.wait(timeout=10)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""
