"""The Slack emulator, driven over real HTTP by the real slack_sdk WebClient."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx
import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import FixedValueRetryIntervalCalculator
from slack_sdk.webhook import WebhookClient

from devtools.emulator import Emulator, EmulatorConfig, create_app, serve_in_thread
from devtools.synth import generate_workspace, write_export
from doppel.slack.export import SlackExport, read_export

TEAM = "T0TEST"
BOT = "xoxb-emulator"
USER_TOKEN = "xoxp-emulator"
BASE = 1_700_000_000
THREAD_TS = f"{BASE + 2 * 60}.000100"  # the third message of #general starts a thread


def _ts(seconds: int) -> str:
    return f"{seconds}.000100"


def _general() -> list[dict]:
    """12 top-level messages, one thread of 5 replies; reply 3 is also broadcast."""
    messages = [
        {
            "type": "message",
            "user": f"U00{i % 3 + 1}",
            "text": f"hello {i}",
            "ts": _ts(BASE + i * 60),
        }
        for i in range(12)
    ]
    for n in range(1, 6):
        reply = {
            "type": "message",
            "user": f"U00{n % 2 + 1}",
            "text": f"reply {n}",
            "ts": _ts(BASE + 2 * 60 + n),
            "thread_ts": THREAD_TS,
        }
        messages.append({**reply, "subtype": "thread_broadcast"} if n == 3 else reply)
    return messages


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> SlackExport:
    root = tmp_path_factory.mktemp("export")
    names = ["alice", "bob", "carol", "dave", "erin"]
    users = [{"id": f"U00{i + 1}", "name": name, "team_id": TEAM} for i, name in enumerate(names)]
    channels = [
        {"id": "C001", "name": "general", "created": BASE, "members": ["U001", "U002", "U003"]},
        {"id": "C002", "name": "random", "created": BASE, "members": ["U001"]},
        {"id": "C003", "name": "old", "created": BASE, "is_archived": True},
    ]
    _write(root / "users.json", users)
    _write(root / "channels.json", channels)
    _write(root / "groups.json", [{"id": "G001", "name": "secret", "members": ["U001"]}])
    _write(root / "general" / "2023-11-14.json", _general())
    random_messages = [
        {"type": "message", "user": "U002", "text": "hi", "ts": _ts(BASE + i)} for i in range(3)
    ]
    _write(root / "random" / "2023-11-14.json", random_messages)
    _write(root / "old" / "2023-11-14.json", [{"type": "message", "text": "x", "ts": _ts(BASE)}])
    _write(root / "secret" / "2023-11-14.json", [{"type": "message", "text": "s", "ts": _ts(BASE)}])
    return read_export(root, include_private=True, max_bytes=10**8)


@contextmanager
def running(workspace: SlackExport, **config: object) -> Iterator[tuple[str, Emulator]]:
    """The emulator on a free port: its API base URL and its live state."""
    app = create_app(workspace, EmulatorConfig(**config))  # type: ignore[arg-type]
    with serve_in_thread(app) as url:
        yield url, app.state.emulator


def _all_pages(pages: Iterator) -> list[dict]:
    """Every item across a paginated slack_sdk response, whatever the list's key."""
    items: list[dict] = []
    for page in pages:
        key = next(k for k in ("messages", "channels", "members") if k in page.data)
        items.extend(page[key])
    return items


def _error(call) -> SlackApiError:
    with pytest.raises(SlackApiError) as caught:
        call()
    return caught.value


def test_auth_and_unknown_methods(workspace: SlackExport) -> None:
    with running(workspace) as (url, _):
        answer = WebClient(token=BOT, base_url=url).auth_test()
        assert answer["team_id"] == TEAM
        assert (answer["user_id"], answer["bot_id"]) == ("UDOPPELBOT", "BDOPPELBOT")
        user = WebClient(token=USER_TOKEN, base_url=url).auth_test()
        assert (user["user_id"], user["user"]) == ("U001", "alice") and "bot_id" not in user.data
        assert WebClient(base_url=url).api_test(foo="bar")["args"] == {"foo": "bar"}
        assert _error(WebClient(base_url=url).auth_test).response["error"] == "not_authed"
        bad = WebClient(token="xoxb-nope", base_url=url)
        assert _error(bad.auth_test).response["error"] == "invalid_auth"
        unknown = _error(lambda: WebClient(token=BOT, base_url=url).api_call("no.such"))
        assert (unknown.response.status_code, unknown.response["error"]) == (404, "unknown_method")
        via_get = httpx.get(url + "conversations.info", params={"channel": "C001", "token": BOT})
        assert via_get.json()["channel"]["name"] == "general"


def test_history_pages_every_top_level_message_once(workspace: SlackExport) -> None:
    top_level = sorted(
        (m["ts"] for m in _general() if m.get("thread_ts") in (None, m["ts"]) or m.get("subtype")),
        reverse=True,
    )
    with running(workspace) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        messages = _all_pages(client.conversations_history(channel="C001", limit=3))
        assert [m["ts"] for m in messages] == top_level
        parent = next(m for m in messages if m["ts"] == THREAD_TS)
        assert parent["reply_count"] == 5 and parent["reply_users_count"] == 2
        assert parent["latest_reply"] == _ts(BASE + 2 * 60 + 5)


def test_history_oldest_and_latest(workspace: SlackExport) -> None:
    oldest, latest = _ts(BASE + 60), _ts(BASE + 4 * 60)
    with running(workspace) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        exclusive = client.conversations_history(channel="C001", oldest=oldest, latest=latest)
        assert [m["ts"] for m in exclusive["messages"]] == [
            _ts(BASE + 3 * 60),
            _ts(BASE + 2 * 60 + 3),  # the broadcast reply
            THREAD_TS,
        ]
        inclusive = client.conversations_history(
            channel="C001", oldest=oldest, latest=latest, inclusive=True, limit=2
        )
        assert [m["ts"] for m in inclusive["messages"]] == [latest, _ts(BASE + 3 * 60)]
        assert inclusive["has_more"] and inclusive["response_metadata"]["next_cursor"]
        rest = client.conversations_history(
            channel="C001",
            oldest=oldest,
            latest=latest,
            inclusive=True,
            cursor=inclusive["response_metadata"]["next_cursor"],
        )
        assert [m["ts"] for m in rest["messages"]][-1] == oldest and not rest["has_more"]
        assert rest["response_metadata"]["next_cursor"] == ""


def test_replies_pages_parent_then_replies(workspace: SlackExport) -> None:
    replies = [_ts(BASE + 2 * 60 + n) for n in range(1, 6)]
    with running(workspace) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        thread = _all_pages(client.conversations_replies(channel="C001", ts=THREAD_TS, limit=2))
        assert [m["ts"] for m in thread] == [THREAD_TS, *replies]
        from_reply = client.conversations_replies(channel="C001", ts=replies[1])
        assert [m["ts"] for m in from_reply["messages"]] == [THREAD_TS, *replies]
        late = client.conversations_replies(channel="C001", ts=THREAD_TS, oldest=replies[2])
        assert [m["ts"] for m in late["messages"]] == [THREAD_TS, *replies[3:]]
        missing = _error(lambda: client.conversations_replies(channel="C001", ts="1.000000"))
        assert missing.response["error"] == "thread_not_found"


def test_cursors_survive_new_messages(workspace: SlackExport) -> None:
    with running(workspace) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        first = client.conversations_history(channel="C001", limit=5)
        client.chat_postMessage(channel="C001", text="new top-level")
        rest = _all_pages(
            client.conversations_history(
                channel="C001", limit=5, cursor=first["response_metadata"]["next_cursor"]
            )
        )
        seen = [m["ts"] for m in first["messages"] + rest]
        assert len(seen) == len(set(seen)) == 13
        start = client.conversations_replies(channel="C001", ts=THREAD_TS, limit=3)
        posted = client.chat_postMessage(channel="C001", text="late reply", thread_ts=THREAD_TS)
        after = _all_pages(
            client.conversations_replies(
                channel="C001",
                ts=THREAD_TS,
                limit=2,
                cursor=start["response_metadata"]["next_cursor"],
            )
        )
        thread = [m["ts"] for m in start["messages"] + after]
        assert len(thread) == len(set(thread)) == 7 and thread[-1] == posted["ts"]


def test_lists_page_channels_and_users(workspace: SlackExport) -> None:
    with running(workspace, bot_channels={"C001", "G001"}) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        public = _all_pages(client.conversations_list(limit=1))
        assert [c["id"] for c in public] == ["C001", "C002", "C003"]
        assert [c["is_member"] for c in public] == [True, False, False]
        assert public[0]["num_members"] == 4 and public[0]["topic"]["value"] == ""
        both = _all_pages(
            client.conversations_list(
                types="public_channel,private_channel", exclude_archived=True, limit=2
            )
        )
        assert [(c["id"], c["is_private"]) for c in both] == [
            ("C001", False),
            ("C002", False),
            ("G001", True),
        ]
        members = _all_pages(client.users_list(limit=2))
        assert [u["id"] for u in members] == ["U001", "U002", "U003", "U004", "U005"]
        assert client.users_info(user="U002")["user"]["name"] == "bob"
        assert _error(lambda: client.users_info(user="U999")).response["error"] == "user_not_found"


def test_membership_errors_and_join(workspace: SlackExport) -> None:
    with running(workspace, bot_channels={"C001"}) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        history = client.conversations_history
        assert _error(lambda: history(channel="C999")).response["error"] == "channel_not_found"
        assert _error(lambda: history(channel="G001")).response["error"] == "channel_not_found"
        assert _error(lambda: history(channel="C002")).response["error"] == "not_in_channel"
        assert WebClient(token=USER_TOKEN, base_url=url).conversations_history(channel="C002")["ok"]
        joined = client.conversations_join(channel="C002")
        assert joined["channel"]["is_member"] and "warning" not in joined.data
        assert len(history(channel="C002")["messages"]) == 3
        again = client.conversations_join(channel="C002")
        assert again["warning"] == "already_in_channel"
        archived = _error(lambda: client.conversations_join(channel="C003"))
        assert archived.response["error"] == "is_archived"


def test_post_reply_update(workspace: SlackExport) -> None:
    with running(workspace) as (url, emulator):
        client = WebClient(token=BOT, base_url=url)
        reply = client.chat_postMessage(
            channel="C001",
            text="in the thread",
            thread_ts=THREAD_TS,
            username="Alice (bot)",
            icon_url="https://example.com/a.png",
        )
        thread = client.conversations_replies(channel="C001", ts=THREAD_TS)["messages"]
        assert thread[-1]["ts"] == reply["ts"] and thread[0]["reply_count"] == 6
        assert thread[-1]["username"] == "Alice (bot)"
        assert thread[-1]["subtype"] == "bot_message"
        assert thread[-1]["icons"] == {"image_72": "https://example.com/a.png"}
        assert thread[-1]["user"] == "UDOPPELBOT" and thread[0]["latest_reply"] == reply["ts"]
        top = client.chat_postMessage(channel="C001", text="top level")
        assert top["ts"] > reply["ts"] and "subtype" not in top["message"]
        newest = client.conversations_history(channel="C001", limit=1)["messages"][0]
        assert newest["ts"] == top["ts"]
        updated = client.chat_update(channel="C001", ts=top["ts"], text="edited")
        assert updated["message"]["edited"]["user"] == "UDOPPELBOT"
        newest = client.conversations_history(channel="C001", limit=1)["messages"][0]
        assert newest["text"] == "edited"
        missing = _error(lambda: client.chat_update(channel="C001", ts="1.000000", text="x"))
        assert missing.response["error"] == "message_not_found"
        with pytest.warns(UserWarning, match="text"):  # slack_sdk warns too, before sending
            empty = _error(lambda: client.chat_postMessage(channel="C001", text=""))
        assert empty.response["error"] == "no_text"
        dump = httpx.get(urljoin(url, "/emulator/messages/C001")).json()
        assert [m["ts"] for m in dump][-2:] == [reply["ts"], top["ts"]]
        assert len(emulator.conversations["C001"].by_ts) == len(_general()) + 2
        assert len(workspace.messages["C001"]) == len(_general())  # the export is untouched
        log = httpx.get(urljoin(url, "/emulator/requests")).json()
        assert {"method": "chat.postMessage", "status": 200} in log


def test_scraping_a_synthetic_export_returns_every_message_once(tmp_path: Path) -> None:
    """History plus the replies of each parent is exactly the export, read from its ZIP."""
    export = write_export(generate_workspace(users=5, days=5, seed=1), tmp_path / "synth.zip")
    workspace = read_export(export, include_private=True, max_bytes=10**8)
    with running(workspace) as (url, _):
        client = WebClient(token=USER_TOKEN, base_url=url)
        assert client.auth_test()["team_id"] == workspace.workspace_id
        types = "public_channel,private_channel,mpim,im"
        channels = _all_pages(client.conversations_list(types=types, limit=2))
        assert {c["id"] for c in channels} == set(workspace.messages)
        for channel in channels:
            top = _all_pages(client.conversations_history(channel=channel["id"], limit=7))
            seen = [m["ts"] for m in top]
            for parent in (m for m in top if m.get("reply_count") and m["thread_ts"] == m["ts"]):
                thread = client.conversations_replies(
                    channel=channel["id"], ts=parent["ts"], limit=3
                )
                seen += [m["ts"] for m in _all_pages(thread)[1:]]
            broadcasts = [m["ts"] for m in top if m.get("subtype") == "thread_broadcast"]
            assert sorted(seen) == sorted(
                [m["ts"] for m in workspace.messages[channel["id"]]] + broadcasts
            )


def test_rate_limit_then_retry(workspace: SlackExport) -> None:
    with running(workspace, rate_limit_per_minute=2, rate_window_seconds=1) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        client.auth_test()
        client.auth_test()
        limited = _error(client.auth_test)
        assert limited.response.status_code == 429
        assert limited.response["error"] == "ratelimited"
        assert limited.response.headers["Retry-After"] == "1"
        client.users_list()  # the limit is per method
        client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
        assert client.auth_test()["ok"]


def test_injected_server_errors(workspace: SlackExport) -> None:
    with running(workspace, fail_rate=1.0) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        statuses = [_error(client.auth_test).response.status_code for _ in range(2)]
        assert statuses == [500, 503]
        assert client.api_test()["ok"]
    with running(workspace, fail_rate=0.5, fail_seed=7) as (url, emulator):
        client = WebClient(token=BOT, base_url=url)
        fast = FixedValueRetryIntervalCalculator(0.01)
        client.retry_handlers.append(
            ServerErrorRetryHandler(max_retry_count=20, interval_calculator=fast)
        )
        assert all(client.auth_test()["ok"] for _ in range(10))
        assert {entry.status for entry in emulator.request_log} >= {200, 500, 503}


def test_faults_replay_with_the_same_seed(workspace: SlackExport) -> None:
    def statuses() -> list[int]:
        emulator = Emulator(workspace, EmulatorConfig(fail_rate=0.3, fail_seed=3))
        return [emulator.call("auth.test", {}, BOT).status for _ in range(30)]

    first = statuses()
    assert first == statuses() and {200, 500, 503} <= set(first)


def test_latency(workspace: SlackExport) -> None:
    with running(workspace, latency_seconds=0.3) as (url, _):
        start = time.monotonic()
        WebClient(base_url=url).api_test()
        assert time.monotonic() - start >= 0.3


def test_oauth_install(workspace: SlackExport) -> None:
    redirect = "https://app.example.com/slack/oauth_redirect"
    with running(workspace) as (url, _):
        consent = httpx.get(
            urljoin(url, "/emulator/oauth/authorize"),
            params={
                "client_id": "emulator-client-id",
                "scope": "channels:history,chat:write",
                "redirect_uri": redirect,
                "state": "s3",
            },
        )
        assert consent.status_code == 302
        location = urlsplit(consent.headers["location"])
        assert location._replace(query="").geturl() == redirect
        query = parse_qs(location.query)
        assert query["state"] == ["s3"]
        code = query["code"][0]
        anonymous = WebClient(base_url=url)
        installed = anonymous.oauth_v2_access(
            client_id="emulator-client-id",
            client_secret="emulator-client-secret",
            code=code,
            redirect_uri=redirect,
        )
        assert installed["token_type"] == "bot" and installed["team"]["id"] == TEAM
        assert installed["scope"] == "channels:history,chat:write"
        assert installed["bot_user_id"] == "UDOPPELBOT"
        token = installed["access_token"]
        assert WebClient(token=token, base_url=url).auth_test()["user_id"] == "UDOPPELBOT"
        reused = _error(
            lambda: anonymous.oauth_v2_access(
                client_id="emulator-client-id", client_secret="emulator-client-secret", code=code
            )
        )
        assert reused.response["error"] == "invalid_code"
        wrong_secret = _error(
            lambda: anonymous.oauth_v2_access(
                client_id="emulator-client-id", client_secret="nope", code=code
            )
        )
        assert wrong_secret.response["error"] == "bad_client_secret"
        wrong_client = _error(
            lambda: anonymous.oauth_v2_access(client_id="x", client_secret="y", code=code)
        )
        assert wrong_client.response["error"] == "invalid_client_id"


def test_posting_to_a_user_id_lands_in_the_apps_dm_with_them(workspace: SlackExport) -> None:
    with running(workspace) as (url, _):
        client = WebClient(token=BOT, base_url=url)
        first = client.chat_postMessage(channel="U002", text="your training started")
        second = client.chat_postMessage(channel="U002", text="your training finished")
        assert first["channel"] == second["channel"] == "D002"
        history = client.conversations_history(channel="D002")["messages"]
        assert [m["text"] for m in history] == ["your training finished", "your training started"]
        dump = httpx.get(urljoin(url, "/emulator/messages/D002")).json()
        assert [m["text"] for m in dump] == ["your training started", "your training finished"]
        as_user = WebClient(token=USER_TOKEN, base_url=url)
        assert (
            _error(lambda: as_user.chat_postMessage(channel="U002", text="x")).response["error"]
            == "channel_not_found"
        )  # only the app has a DM with everyone


def test_response_urls_keep_what_is_posted_to_them(workspace: SlackExport) -> None:
    with running(workspace) as (url, emulator):
        hook = urljoin(url, "/emulator/responses/cmd-1")
        WebhookClient(hook).send(text="first answer", response_type="ephemeral")
        WebhookClient(hook).send(text="second answer")
        answers = httpx.get(hook).json()
        assert [a["text"] for a in answers] == ["first answer", "second answer"]
        assert answers[0]["response_type"] == "ephemeral"
        assert emulator.responses["cmd-1"] == answers
        assert httpx.get(urljoin(url, "/emulator/responses/other")).json() == []
        assert httpx.post(hook, content=b"not json").status_code == 400
