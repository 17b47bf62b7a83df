"""A Slack Web API emulator that serves a workspace export over HTTP.

The scraper, the bot and the demo talk to it with the unchanged `slack_sdk.WebClient`
(`base_url="http://HOST:PORT/api/"`), so everything that reaches real Slack can be
exercised offline: cursor pagination, threads, posting, OAuth installs, and the faults
real Slack throws at clients (rate limits with Retry-After, 5xx answers, slow replies).

Helper endpoints outside Slack's API make the state easy to check:
`GET /emulator/messages/{channel}`, `GET /emulator/requests`,
`GET /emulator/oauth/authorize` (Slack's consent screen with "Allow" already clicked)
and `/emulator/responses/{key}` (a slash command's `response_url`: POST to answer, GET
to read the answers).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import math
import random
import secrets
import threading
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from doppel.config import ExportSettings
from doppel.slack.export import SlackDict, SlackExport, read_export

Params = dict[str, Any]

APP_ID = "AEMULATOR"
TEAM_URL = "https://emulated.slack.com/"
DEFAULT_INSTALLER = "UEMULATOR"  # who "installed" the app when the export has no humans
NO_AUTH_METHODS = frozenset({"api.test", "oauth.v2.access"})
NO_FAULT_METHODS = frozenset({"api.test"})


@dataclass
class EmulatorConfig:
    """How the emulator behaves; the fault knobs mimic what real Slack does to clients."""

    rate_limit_per_minute: int | None = None  # per method, per window; None = unlimited
    rate_window_seconds: float = 60.0  # tests shrink the window to keep retries fast
    fail_rate: float = 0.0  # fraction of calls answered 500/503
    fail_seed: int = 0  # seeds the fault dice so a run can be replayed
    latency_seconds: float = 0.0  # added before every API answer
    bot_user: str = "UDOPPELBOT"
    team_name: str = (
        "Emulated workspace"  # exports carry no team name; run_emulator uses the file's
    )
    bot_channels: set[str] | None = None  # None = the bot is in every public channel
    tokens: set[str] = field(default_factory=lambda: {"xoxb-emulator", "xoxp-emulator"})
    max_page_size: int = 1000
    client_id: str = "emulator-client-id"
    client_secret: str = "emulator-client-secret"


class SlackError(Exception):
    """A Slack error answer: `{"ok": false, "error": ...}`."""

    def __init__(self, error: str, status: int = 200) -> None:
        super().__init__(error)
        self.error = error
        self.status = status


class Reply(NamedTuple):
    """One HTTP answer of the API route."""

    status: int
    body: SlackDict
    headers: dict[str, str] | None = None


class LoggedRequest(NamedTuple):
    """What the emulator was asked and how it answered, for tests to inspect."""

    method: str
    params: Params
    status: int


@dataclass(frozen=True)
class Identity:
    """Who a token speaks for: the bot (bot_id set) or the installing user."""

    user_id: str
    bot_id: str | None = None


ANONYMOUS = Identity(user_id="")  # what methods that need no token see


@dataclass
class OAuthGrant:
    """What the user allowed on the consent screen, waiting to be exchanged for tokens."""

    scope: str
    user_scope: str
    redirect_uri: str


def _ts_key(ts: str) -> Decimal:
    """Slack timestamps compare as decimals; strings break when the digit count changes."""
    key = Decimal(ts)
    if not key.is_finite():
        raise InvalidOperation(ts)
    return key


def _message_key(message: SlackDict) -> Decimal:
    return _ts_key(message["ts"])


def _parent_ts(message: SlackDict) -> str | None:
    """The thread a reply belongs to; None for top-level messages and thread parents."""
    thread_ts = message.get("thread_ts")
    return thread_ts if thread_ts and thread_ts != message["ts"] else None


class Conversation:
    """One channel's messages, indexed the ways the API reads them."""

    def __init__(self, info: SlackDict, messages: list[SlackDict]) -> None:
        self.info = info
        self.by_ts: dict[str, SlackDict] = {}
        self.timeline: list[SlackDict] = []  # what conversations.history shows, oldest first
        self.threads: dict[str, list[SlackDict]] = {}  # parent ts -> replies, oldest first
        for message in messages:
            self.add(message)
        for parent_ts in self.threads:
            self.refresh_parent(parent_ts)

    @property
    def id(self) -> str:
        return self.info["id"]

    def kind(self) -> str:
        """The `types` value of conversations.list that selects this conversation."""
        if self.info.get("is_im"):
            return "im"
        if self.info.get("is_mpim"):
            return "mpim"
        return "private_channel" if self.info.get("is_private") else "public_channel"

    def add(self, message: SlackDict) -> None:
        self.by_ts[message["ts"]] = message
        parent_ts = _parent_ts(message)
        if parent_ts is None or message.get("subtype") == "thread_broadcast":
            insort(self.timeline, message, key=_message_key)
        if parent_ts is not None:
            insort(self.threads.setdefault(parent_ts, []), message, key=_message_key)

    def refresh_parent(self, parent_ts: str) -> None:
        """Keep a parent's thread summary in step with its replies, as Slack does."""
        parent = self.by_ts.get(parent_ts)
        replies = self.threads.get(parent_ts)
        if parent is None or not replies:
            return
        users = list(dict.fromkeys(reply["user"] for reply in replies if reply.get("user")))
        parent.update(
            thread_ts=parent_ts,
            reply_count=len(replies),
            reply_users=users,
            reply_users_count=len(users),
            latest_reply=replies[-1]["ts"],
        )

    def thread_root(self, ts: str) -> str:
        """The parent's ts for a reply whose parent is here; otherwise `ts` itself."""
        message = self.by_ts.get(ts)
        parent_ts = _parent_ts(message) if message else None
        return parent_ts if parent_ts in self.by_ts else ts

    def all_messages(self) -> list[SlackDict]:
        return sorted(self.by_ts.values(), key=_message_key)


class Emulator:
    """The live workspace: conversations, tokens, OAuth codes, fault state and request log."""

    def __init__(self, workspace: SlackExport, config: EmulatorConfig) -> None:
        self.config = config
        self.workspace = workspace
        self.team_id = workspace.team_id or "TEMULATOR"
        messages = copy.deepcopy(workspace.messages)  # posting must not alter the caller's export
        self.conversations = {
            info["id"]: Conversation(dict(info), messages.get(info["id"], []))
            for info in sorted(workspace.channels, key=lambda info: info["id"])
        }
        self.users = sorted(workspace.users, key=lambda user: user["id"])
        self.installer = next(
            (
                user["id"]
                for user in self.users
                if not user.get("is_bot") and not user.get("deleted") and user["id"] != "USLACKBOT"
            ),
            DEFAULT_INSTALLER,
        )
        self.members: set[str] = (
            set(config.bot_channels)
            if config.bot_channels is not None
            else {c.id for c in self.conversations.values() if c.kind() == "public_channel"}
        )
        self.tokens = set(config.tokens)
        self.oauth_codes: dict[str, OAuthGrant] = {}
        self.responses: dict[str, list[SlackDict]] = {}  # response_url key -> messages
        self.request_log: list[LoggedRequest] = []
        self._fault_dice = random.Random(config.fail_seed)
        self._failures = 0
        self._windows: dict[str, tuple[float, int]] = {}  # method -> (window start, calls)
        self._last_ts = Decimal(0)

    @property
    def bot_id(self) -> str:
        return "B" + self.config.bot_user[1:]

    def call(self, method: str, params: Params, token: str | None) -> Reply:
        """Answer one Web API call and log it."""
        reply = self._answer(method, params, token or params.get("token"))
        self.request_log.append(LoggedRequest(method, params, reply.status))
        return reply

    def _answer(self, method: str, params: Params, token: str | None) -> Reply:
        handler = METHODS.get(method)
        try:
            if handler is None:
                raise SlackError("unknown_method", status=404)
            fault = self._rate_limited(method) or self._injected_failure(method)
            if fault is not None:
                return fault
            who = ANONYMOUS if method in NO_AUTH_METHODS else self.authenticate(token)
            return Reply(200, {"ok": True, **handler(self, params, who)})
        except SlackError as error:
            return Reply(error.status, {"ok": False, "error": error.error})

    def _rate_limited(self, method: str) -> Reply | None:
        """A fixed window per method, like Slack's per-method tiers."""
        limit = self.config.rate_limit_per_minute
        if limit is None:
            return None
        now = time.monotonic()
        start, calls = self._windows.get(method, (now, 0))
        if now - start >= self.config.rate_window_seconds:
            start, calls = now, 0
        self._windows[method] = (start, calls + 1)
        if calls < limit:
            return None
        retry_after = max(1, math.ceil(start + self.config.rate_window_seconds - now))
        return Reply(429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(retry_after)})

    def _injected_failure(self, method: str) -> Reply | None:
        """Seeded dice, so a flaky run can be replayed exactly; alternates 500 and 503."""
        rate = self.config.fail_rate
        if method in NO_FAULT_METHODS or rate <= 0 or self._fault_dice.random() >= rate:
            return None
        self._failures += 1
        status = 500 if self._failures % 2 else 503
        return Reply(status, {"ok": False, "error": "internal_error"})

    def authenticate(self, token: str | None) -> Identity:
        if not token:
            raise SlackError("not_authed")
        if token not in self.tokens:
            raise SlackError("invalid_auth")
        if token.startswith("xoxb-"):
            return Identity(user_id=self.config.bot_user, bot_id=self.bot_id)
        return Identity(user_id=self.installer)

    def is_member(self, conversation: Conversation, who: Identity) -> bool:
        """Bots see what they were added to; user tokens stand for a user in everything."""
        return who.bot_id is None or conversation.id in self.members

    def is_visible(self, conversation: Conversation, who: Identity) -> bool:
        """Slack hides private conversations from those outside them."""
        return conversation.kind() == "public_channel" or self.is_member(conversation, who)

    def conversation(self, params: Params, who: Identity) -> Conversation:
        """The conversation named by `channel`, if the caller may know it exists."""
        conversation = self.conversations.get(params.get("channel") or "")
        if conversation is None or not self.is_visible(conversation, who):
            raise SlackError("channel_not_found")
        return conversation

    def direct_message(self, user_id: str) -> Conversation:
        """The app's DM with a person (`D` + their id without its `U`), opened on first use."""
        dm_id = "D" + user_id[1:]
        if dm_id not in self.conversations:
            info = {"id": dm_id, "is_im": True, "user": user_id, "created": int(time.time())}
            self.conversations[dm_id] = Conversation(info, [])
            self.members.add(dm_id)
        return self.conversations[dm_id]

    def readable(self, params: Params, who: Identity) -> Conversation:
        """The conversation named by `channel`, if the caller may read and write it."""
        conversation = self.conversation(params, who)
        if not self.is_member(conversation, who):
            raise SlackError("not_in_channel")
        return conversation

    def channel_object(self, conversation: Conversation, who: Identity) -> SlackDict:
        """Slack's conversation object, built from the export's channel entry."""
        info = conversation.info
        kind = conversation.kind()
        members = set(info.get("members") or [])
        if conversation.id in self.members:
            members.add(self.config.bot_user)
        empty_text = {"value": "", "creator": "", "last_set": 0}
        return {
            **{key: value for key, value in info.items() if key not in ("members", "pins")},
            "is_channel": kind in ("public_channel", "private_channel"),
            "is_group": kind == "private_channel",
            "is_private": kind != "public_channel",
            "is_im": kind == "im",
            "is_mpim": kind == "mpim",
            "is_archived": bool(info.get("is_archived")),
            "is_member": self.is_member(conversation, who),
            "created": info.get("created", 0),
            "topic": info.get("topic") or empty_text,
            "purpose": info.get("purpose") or empty_text,
            "num_members": len(members),
        }

    def user(self, user_id: str | None) -> SlackDict | None:
        return next((user for user in self.users if user["id"] == user_id), None)

    def next_ts(self) -> str:
        """A fresh message ts from the clock, strictly after every one handed out before."""
        now = Decimal(f"{time.time():.6f}")
        self._last_ts = max(now, self._last_ts + Decimal("0.000001"))
        return f"{self._last_ts:.6f}"

    def authorize(self, params: Params) -> str:
        """Issue a single-use code, as Slack does when the user clicks Allow."""
        if params.get("client_id") != self.config.client_id:
            raise SlackError("invalid_client_id", status=400)
        if not params.get("redirect_uri"):
            raise SlackError("bad_redirect_uri", status=400)
        code = secrets.token_hex(16)
        self.oauth_codes[code] = OAuthGrant(
            scope=params.get("scope", ""),
            user_scope=params.get("user_scope", ""),
            redirect_uri=params["redirect_uri"],
        )
        return code

    def issue_token(self, prefix: str) -> str:
        token = f"{prefix}-{secrets.token_hex(12)}"
        self.tokens.add(token)
        return token


# --- request parameters ------------------------------------------------------------------


def _flag(params: Params, name: str) -> bool:
    return params.get(name) in (True, 1, "1", "true", "True")


def _limit(emulator: Emulator, params: Params, default: int) -> int:
    """Slack's `limit`: absent or 0 means the method's default; capped at max_page_size."""
    raw = params.get("limit") or default
    try:
        limit = int(raw)
    except (TypeError, ValueError):
        raise SlackError("invalid_limit") from None
    return max(1, min(limit if limit > 0 else default, emulator.config.max_page_size))


def _ts_param(params: Params, name: str) -> Decimal | None:
    raw = params.get(name)
    if raw in (None, ""):
        return None
    try:
        return _ts_key(str(raw))
    except InvalidOperation:
        raise SlackError(f"invalid_ts_{name}") from None


def _ts_range(messages: list[SlackDict], params: Params) -> tuple[int, int]:
    """Index range of `messages` within oldest/latest; both exclusive unless `inclusive`."""
    oldest, latest = _ts_param(params, "oldest"), _ts_param(params, "latest")
    inclusive = _flag(params, "inclusive")
    low, high = 0, len(messages)
    if oldest is not None:
        low = (bisect_left if inclusive else bisect_right)(messages, oldest, key=_message_key)
    if latest is not None:
        high = (bisect_right if inclusive else bisect_left)(messages, latest, key=_message_key)
    return low, max(low, high)


# --- cursors: base64 of "kind:boundary", so pages stay exact while messages are added -------


def _cursor(kind: str, boundary: str | None) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{boundary}".encode()).decode() if boundary else ""


def _read_cursor(params: Params, kind: str) -> str | None:
    raw = params.get("cursor")
    if not raw:
        return None
    try:
        decoded = base64.urlsafe_b64decode(str(raw).encode()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise SlackError("invalid_cursor") from None
    found_kind, _, boundary = decoded.partition(":")
    if found_kind != kind or not boundary:
        raise SlackError("invalid_cursor")
    return boundary


def _read_ts_cursor(params: Params, kind: str) -> Decimal | None:
    boundary = _read_cursor(params, kind)
    try:
        return None if boundary is None else _ts_key(boundary)
    except InvalidOperation:
        raise SlackError("invalid_cursor") from None


def _page_by_id(
    emulator: Emulator, items: list[SlackDict], params: Params, default_limit: int
) -> tuple[list[SlackDict], SlackDict]:
    """A page of id-sorted objects after the cursor's id, with its response_metadata."""
    after = _read_cursor(params, "after_id")
    remaining = [item for item in items if after is None or item["id"] > after]
    page = remaining[: _limit(emulator, params, default_limit)]
    more = len(remaining) > len(page)
    return page, {"next_cursor": _cursor("after_id", page[-1]["id"] if more else None)}


# --- Web API methods ---------------------------------------------------------------------


def api_test(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """Echo the arguments; `error=x` makes it fail with x, as on Slack."""
    if params.get("error"):
        raise SlackError(str(params["error"]))
    return {"args": {key: value for key, value in params.items() if key != "token"}}


def auth_test(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """The export's team id, so file imports and emulator scrapes land in one workspace."""
    answer = {
        "url": TEAM_URL,
        "team": emulator.config.team_name,
        "user": "doppelbot" if who.bot_id else (emulator.user(who.user_id) or {}).get("name"),
        "team_id": emulator.team_id,
        "user_id": who.user_id,
        "is_enterprise_install": False,
    }
    return {**answer, "bot_id": who.bot_id} if who.bot_id else answer


def conversations_list(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    types = params.get("types") or "public_channel"
    wanted = set(types.split(",") if isinstance(types, str) else types)
    exclude_archived = _flag(params, "exclude_archived")
    listed = [
        emulator.channel_object(conversation, who)
        for conversation in emulator.conversations.values()
        if conversation.kind() in wanted
        and emulator.is_visible(conversation, who)
        and not (exclude_archived and conversation.info.get("is_archived"))
    ]
    page, metadata = _page_by_id(emulator, listed, params, default_limit=100)
    return {"channels": page, "response_metadata": metadata}


def conversations_info(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    return {"channel": emulator.channel_object(emulator.conversation(params, who), who)}


def conversations_join(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    conversation = emulator.conversation(params, who)
    if conversation.kind() != "public_channel":
        raise SlackError("method_not_supported_for_channel_type")
    if conversation.info.get("is_archived"):
        raise SlackError("is_archived")
    already = emulator.is_member(conversation, who)
    if who.bot_id:
        emulator.members.add(conversation.id)
    answer = {"channel": emulator.channel_object(conversation, who)}
    return {**answer, "warning": "already_in_channel"} if already else answer


def conversations_history(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """Newest first; a cursor holds the oldest ts handed out, so new posts never shift pages."""
    timeline = emulator.readable(params, who).timeline
    low, high = _ts_range(timeline, params)
    before = _read_ts_cursor(params, "before_ts")
    if before is not None:
        high = max(low, min(high, bisect_left(timeline, before, key=_message_key)))
    start = max(low, high - _limit(emulator, params, default=100))
    page = timeline[start:high][::-1]
    more = start > low
    return {
        "messages": page,
        "has_more": more,
        "pin_count": 0,
        "response_metadata": {
            "next_cursor": _cursor("before_ts", page[-1]["ts"] if more else None)
        },
    }


def conversations_replies(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """The parent first (first page only), then replies oldest first."""
    conversation = emulator.readable(params, who)
    message = conversation.by_ts.get(params.get("ts") or "")
    if message is None:
        raise SlackError("thread_not_found")
    root_ts = conversation.thread_root(message["ts"])
    parent = conversation.by_ts[root_ts]
    replies = conversation.threads.get(root_ts, [])
    low, high = _ts_range(replies, params)
    after = _read_ts_cursor(params, "after_ts")
    if after is not None:
        low = min(high, max(low, bisect_right(replies, after, key=_message_key)))
    head = [parent] if after is None else []
    end = min(high, low + _limit(emulator, params, default=1000) - len(head))
    page = head + replies[low:end]
    more = end < high
    return {
        "messages": page,
        "has_more": more,
        "response_metadata": {"next_cursor": _cursor("after_ts", page[-1]["ts"] if more else None)},
    }


def users_list(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    default = emulator.config.max_page_size  # Slack returns everything when limit is 0
    page, metadata = _page_by_id(emulator, emulator.users, params, default_limit=default)
    return {"members": page, "cache_ts": int(time.time()), "response_metadata": metadata}


def users_info(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    user = emulator.user(params.get("user"))
    if user is None:
        raise SlackError("user_not_found")
    return {"user": user}


def _blocks(params: Params) -> Any:
    """Blocks arrive as a list in JSON bodies and as a JSON string in form bodies."""
    blocks = params.get("blocks")
    if not isinstance(blocks, str):
        return blocks or None
    try:
        return json.loads(blocks) if blocks else None
    except json.JSONDecodeError:
        raise SlackError("invalid_blocks") from None


def chat_post_message(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """A user id as `channel` posts in the app's DM with that person, as on Slack."""
    if who.bot_id and emulator.user(params.get("channel")) is not None:
        params = {**params, "channel": emulator.direct_message(params["channel"]).id}
    conversation = emulator.readable(params, who)
    if conversation.info.get("is_archived"):
        raise SlackError("is_archived")
    text, blocks = params.get("text") or "", _blocks(params)
    if not text and not blocks:
        raise SlackError("no_text")
    username, icon_url = params.get("username"), params.get("icon_url")
    thread_ts = conversation.thread_root(params["thread_ts"]) if params.get("thread_ts") else None
    fields = {
        "type": "message",
        "subtype": "bot_message" if username else None,
        "user": who.user_id,
        "bot_id": who.bot_id,
        "app_id": APP_ID if who.bot_id else None,
        "text": text,
        "blocks": blocks,
        "ts": emulator.next_ts(),
        "team": emulator.team_id,
        "username": username,
        "icons": {"image_72": icon_url} if icon_url else None,
        "thread_ts": thread_ts,
    }
    message = {key: value for key, value in fields.items() if value is not None}
    conversation.add(message)
    if thread_ts:
        conversation.refresh_parent(thread_ts)
    return {"channel": conversation.id, "ts": message["ts"], "message": message}


def chat_update(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    conversation = emulator.readable(params, who)
    message = conversation.by_ts.get(params.get("ts") or "")
    if message is None:
        raise SlackError("message_not_found")
    text, blocks = params.get("text") or "", _blocks(params)
    if not text and not blocks:
        raise SlackError("no_text")
    message.update(text=text, edited={"user": who.user_id, "ts": emulator.next_ts()})
    if blocks:
        message["blocks"] = blocks
    return {"channel": conversation.id, "ts": message["ts"], "text": text, "message": message}


def oauth_v2_access(emulator: Emulator, params: Params, who: Identity) -> SlackDict:
    """Exchange a consent-screen code for a bot token (and a user token if asked for)."""
    if params.get("client_id") != emulator.config.client_id:
        raise SlackError("invalid_client_id")
    if params.get("client_secret") != emulator.config.client_secret:
        raise SlackError("bad_client_secret")
    grant = emulator.oauth_codes.pop(params.get("code") or "", None)
    if grant is None:
        raise SlackError("invalid_code")
    if params.get("redirect_uri") not in (None, "", grant.redirect_uri):
        raise SlackError("bad_redirect_uri")
    authed_user: SlackDict = {"id": emulator.installer}
    if grant.user_scope:
        authed_user.update(
            scope=grant.user_scope, access_token=emulator.issue_token("xoxp"), token_type="user"
        )
    return {
        "app_id": APP_ID,
        "authed_user": authed_user,
        "scope": grant.scope,
        "token_type": "bot",
        "access_token": emulator.issue_token("xoxb"),
        "bot_user_id": emulator.config.bot_user,
        "team": {"id": emulator.team_id, "name": emulator.config.team_name},
        "enterprise": None,
        "is_enterprise_install": False,
    }


Handler = Callable[[Emulator, Params, Identity], SlackDict]

METHODS: dict[str, Handler] = {
    "api.test": api_test,
    "auth.test": auth_test,
    "conversations.list": conversations_list,
    "conversations.info": conversations_info,
    "conversations.join": conversations_join,
    "conversations.history": conversations_history,
    "conversations.replies": conversations_replies,
    "users.list": users_list,
    "users.info": users_info,
    "chat.postMessage": chat_post_message,
    "chat.update": chat_update,
    "oauth.v2.access": oauth_v2_access,
}


# --- HTTP layer ---------------------------------------------------------------------------

router = APIRouter()


async def _request_params(request: Request) -> tuple[Params, str | None]:
    """Query, form or JSON params, plus the Bearer token; Basic auth carries OAuth clients."""
    params: Params = dict(request.query_params)
    body = await request.body()
    if body.strip():
        if "json" in request.headers.get("content-type", ""):
            try:
                decoded = json.loads(body)
            except json.JSONDecodeError:
                raise SlackError("invalid_json") from None
            if not isinstance(decoded, dict):
                raise SlackError("invalid_json")
            params.update(decoded)
        else:
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            client_id, _, secret = base64.b64decode(credentials).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise SlackError("invalid_client_id") from None
        params.setdefault("client_id", client_id)
        params.setdefault("client_secret", secret)
    return params, credentials.strip() if scheme.lower() == "bearer" else None


def _emulator(request: Request) -> Emulator:
    return request.app.state.emulator


@router.api_route("/api/{method}", methods=["GET", "POST"])
async def web_api(method: str, request: Request) -> JSONResponse:
    emulator = _emulator(request)
    if emulator.config.latency_seconds > 0:
        await asyncio.sleep(emulator.config.latency_seconds)
    try:
        params, token = await _request_params(request)
    except SlackError as error:
        emulator.request_log.append(LoggedRequest(method, {}, error.status))
        return JSONResponse({"ok": False, "error": error.error}, status_code=error.status)
    reply = emulator.call(method, params, token)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


@router.get("/emulator/oauth/authorize")
async def oauth_authorize(request: Request) -> Response:
    """Slack's consent screen after "Allow": redirect back with a code and the state."""
    params = dict(request.query_params)
    try:
        code = _emulator(request).authorize(params)
    except SlackError as error:
        return JSONResponse({"ok": False, "error": error.error}, status_code=error.status)
    answer = {"code": code, **({"state": params["state"]} if "state" in params else {})}
    parts = urlsplit(params["redirect_uri"])
    query = f"{parts.query}&{urlencode(answer)}" if parts.query else urlencode(answer)
    return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)


@router.post("/emulator/responses/{key}")
async def response_url(key: str, request: Request) -> JSONResponse:
    """A slash command's `response_url`: what an app posts here is kept for tests."""
    try:
        message = json.loads(await request.body())
    except json.JSONDecodeError:
        return JSONResponse({"ok": False, "error": "invalid_json"}, status_code=400)
    _emulator(request).responses.setdefault(key, []).append(message)
    return JSONResponse({"ok": True})


@router.get("/emulator/responses/{key}")
async def responses(key: str, request: Request) -> JSONResponse:
    """Every message posted to one `response_url`, oldest first."""
    return JSONResponse(_emulator(request).responses.get(key, []))


@router.get("/emulator/messages/{channel}")
async def channel_messages(channel: str, request: Request) -> JSONResponse:
    """Every message of a channel, replies included, oldest first."""
    conversation = _emulator(request).conversations.get(channel)
    if conversation is None:
        return JSONResponse({"ok": False, "error": "channel_not_found"}, status_code=404)
    return JSONResponse(conversation.all_messages())


@router.get("/emulator/requests")
async def logged_requests(request: Request) -> list[dict[str, Any]]:
    return [{"method": e.method, "status": e.status} for e in _emulator(request).request_log]


def create_app(workspace: SlackExport, config: EmulatorConfig | None = None) -> FastAPI:
    """The emulator app; its live state is `app.state.emulator` (an `Emulator`)."""
    app = FastAPI(title="Slack Web API emulator", docs_url=None, redoc_url=None)
    app.state.emulator = Emulator(workspace, config or EmulatorConfig())
    app.include_router(router)
    return app


def run_emulator(
    export_path: Path | str, host: str = "127.0.0.1", port: int = 8765, **config: Any
) -> None:
    """Serve an export (ZIP or folder, private conversations included) until interrupted.

    `config` takes EmulatorConfig's fields, e.g. `rate_limit_per_minute=20, fail_rate=0.1,
    bot_user="U123"`. Clients use `WebClient(token="xoxb-emulator",
    base_url=f"http://{host}:{port}/api/")`.
    """
    max_bytes = ExportSettings().max_unzipped_mb * 2**20
    workspace = read_export(Path(export_path), include_private=True, max_bytes=max_bytes)
    config.setdefault("team_name", Path(export_path).stem)  # as `doppel ingest export` names it
    uvicorn.run(create_app(workspace, EmulatorConfig(**config)), host=host, port=port)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` on a free port in a background thread; yields the API base URL.

    The URL ends in `/api/`, ready for `WebClient(base_url=...)`; the helper endpoints are
    at `urljoin(url, "/emulator/...")`. The server is shut down when the block exits.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="slack-emulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the Slack emulator did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}/api/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
