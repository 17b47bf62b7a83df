"""The Slack world of the Slack app's tests: the emulator as Slack, the app under uvicorn
beside it, both on 127.0.0.1, and requests signed as Slack signs them."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from slack_sdk.signature import SignatureVerifier
from sqlalchemy import select

from devtools.emulator import Emulator, EmulatorConfig, create_app, serve_in_thread
from doppel.config import get_settings
from doppel.slack.export import read_export
from doppel.store.database import Database
from serving.slack import standalone_app
from tests.helpers import TEAM
from tests.servers import free_port

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
ALICE, BRUNO, CHIARA = "U0000001", "U0000002", "U0000003"
GENERAL = "C0000001"
BOT_USER = "UDOPPELBOT"


def signed(body: str, secret: str = SECRET, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack adds: HMAC-SHA256 over "v0:<timestamp>:<body>"."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    return {"X-Slack-Request-Timestamp": stamp, "X-Slack-Signature": signature}


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class SlackWorld:
    """Slack (the emulator) and the DoppelBot Slack app, both on 127.0.0.1."""

    emulator: Emulator
    emulator_url: str  # ends in "/"
    app_url: str  # ends in "/"
    http: httpx.Client

    def post(self, body: str, content_type: str, headers: dict[str, str]) -> httpx.Response:
        return self.http.post(
            self.app_url + "slack/events",
            content=body,
            headers={"Content-Type": content_type, **headers},
        )

    def send_command(self, text: str, user: str = ALICE, team: str = TEAM, **kw) -> str:
        """Post `/doppel text` signed; returns the response_url key it will be answered on."""
        key = f"{user}-{time.monotonic_ns()}"
        form = {
            "token": "legacy",
            "team_id": team,
            "team_domain": "synthco",
            "channel_id": kw.get("channel", GENERAL),
            "channel_name": "general",
            "user_id": user,
            "user_name": user.lower(),
            "command": "/doppel",
            "text": text,
            "api_app_id": "AEMULATOR",
            "response_url": f"{self.emulator_url}emulator/responses/{key}",
            "trigger_id": "13345224609.738474920.8088930838d88f008e0",
        }
        body = urlencode(form)
        answer = self.post(body, "application/x-www-form-urlencoded", signed(body))
        assert answer.status_code == 200, answer.text
        return key

    def command(self, text: str, user: str = ALICE, team: str = TEAM, **kw) -> str:
        """`/doppel text`, and the answer the requester sees."""
        key = self.send_command(text, user, team, **kw)
        (answer,) = wait_for(lambda: self.emulator.responses.get(key), 120, f"/doppel {text}")
        return answer["text"]

    def event(
        self, event: dict, event_id: str, team: str = TEAM, retry: int | None = None
    ) -> httpx.Response:
        envelope = {
            "token": "legacy",
            "team_id": team,
            "api_app_id": "AEMULATOR",
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [{"team_id": team, "user_id": BOT_USER, "is_bot": True}],
        }
        body = json.dumps(envelope)
        headers = signed(body)
        if retry:
            headers |= {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return self.post(body, "application/json", headers)

    def say(self, user: str, words: str, thread_ts: str | None = None) -> str:
        """Someone posts in #general (straight into Slack's state); returns the ts."""
        conversation = self.emulator.conversations[GENERAL]
        message = {"type": "message", "user": user, "text": words, "ts": self.emulator.next_ts()}
        if thread_ts:
            message["thread_ts"] = thread_ts
        conversation.add(message)
        if thread_ts:
            conversation.refresh_parent(thread_ts)
        return message["ts"]

    def mention(self, user: str, words: str, event_id: str, thread_ts: str | None = None):
        """Someone @mentions the bot; Slack sends `app_mention`. Returns (event, response)."""
        ts = self.say(user, f"<@{BOT_USER}> {words}", thread_ts)
        event = {
            "type": "app_mention",
            "user": user,
            "text": f"<@{BOT_USER}> {words}",
            "ts": ts,
            "channel": GENERAL,
            "event_ts": ts,
            **({"thread_ts": thread_ts} if thread_ts else {}),
        }
        return event, self.event(event, event_id)

    def bot_replies(self, root: str) -> list[dict]:
        return [
            m for m in self.emulator.conversations[GENERAL].threads.get(root, []) if m.get("bot_id")
        ]

    def ephemerals(self, user: str) -> list[str]:
        """What the app told `user` alone (`chat.postEphemeral`), oldest first."""
        return [
            entry.params["text"]
            for entry in self.emulator.request_log
            if entry.method == "chat.postEphemeral"
            and entry.status == 200
            and entry.params.get("user") == user
        ]

    def dms(self, user: str) -> list[str]:
        conversation = self.emulator.conversations.get("D" + user[1:])
        return [m["text"] for m in conversation.all_messages()] if conversation else []


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn on a free port; yields its base URL."""
    with serve_in_thread(app) as url:
        yield url.removesuffix("api/")


@contextmanager
def slack_world(
    monkeypatch: pytest.MonkeyPatch, export: Path, latency: float = 0.0, **env: str | None
) -> Iterator[SlackWorld]:
    """The emulator serving `export`, and the Slack app pointed at it. `env` overrides the
    single-workspace defaults (None removes a variable)."""
    workspace = read_export(export, include_private=True, max_bytes=2**26)
    emulator_app = create_app(
        workspace, EmulatorConfig(team_name="synthco", latency_seconds=latency)
    )
    with running(emulator_app) as emulator_url:
        settings = {
            "SLACK_API_URL": emulator_url + "api/",
            "SLACK_BOT_TOKEN": "xoxb-emulator",
            "SLACK_SIGNING_SECRET": SECRET,
            "DOPPEL_SERVING_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        } | env
        for name, value in settings.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:  # "{emulator}" stands for the emulator's base URL
                monkeypatch.setenv(name, value.format(emulator=emulator_url))
        get_settings.cache_clear()
        with running(standalone_app(get_settings())) as app_url, httpx.Client(timeout=30) as http:
            yield SlackWorld(emulator_app.state.emulator, emulator_url, app_url, http)


def a_thread(world: SlackWorld) -> str:
    """The ts of a thread in #general."""
    return next(iter(world.emulator.conversations[GENERAL].threads))


def rows(db: Database, model: type) -> list:
    with db.session() as session:
        return list(session.scalars(select(model)))


# -- the prompt: live threads render exactly as training samples ------------------------
