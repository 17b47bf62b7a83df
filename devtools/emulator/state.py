"""The emulator's live workspace: conversations, tokens, OAuth codes, faults, request log.

Everything lives in memory and starts as a deep copy of an export, so posting never
alters the caller's data. Method handlers register here (see `methods`), which lets
`Emulator.call` answer a Web API call without the HTTP layer. One emulator can serve
several workspaces, each an `Emulator` with tokens of its own: `route` sends a call to
the workspace whose token it carries, as Slack does, so a token only ever reads the
workspace it was issued for.
"""

from __future__ import annotations

import copy
import math
import random
import secrets
import time
from bisect import insort
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple

from doppel.slack.export import SlackExport
from doppel.types import SlackDict

Params = dict[str, Any]

DEFAULT_WORKSPACE_ID = "TEMULATOR"  # for exports that name no workspace
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
    team_name: str = "Emulated workspace"  # exports carry no name; run_emulator uses the file's
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
    """What the emulator was asked, with which token, and how it answered, for tests."""

    method: str
    params: Params
    status: int
    token: str | None = None


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


Handler = Callable[["Emulator", Params, Identity], SlackDict]
METHODS: dict[str, Handler] = {}  # Slack method name -> handler, filled by `methods`


def slack_method(name: str) -> Callable[[Handler], Handler]:
    """Register a handler as the Web API method `name` (e.g. "chat.postMessage")."""

    def register(handler: Handler) -> Handler:
        METHODS[name] = handler
        return handler

    return register


def ts_key(ts: str) -> Decimal:
    """Slack timestamps compare as decimals; strings break when the digit count changes."""
    key = Decimal(ts)
    if not key.is_finite():
        raise InvalidOperation(ts)
    return key


def message_key(message: SlackDict) -> Decimal:
    return ts_key(message["ts"])


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
            insort(self.timeline, message, key=message_key)
        if parent_ts is not None:
            insort(self.threads.setdefault(parent_ts, []), message, key=message_key)

    def remove(self, message: SlackDict) -> None:
        """Take a message out of every index, as `chat.delete` does."""
        del self.by_ts[message["ts"]]
        if message in self.timeline:
            self.timeline.remove(message)
        parent_ts = _parent_ts(message)
        if parent_ts is not None:
            self.threads[parent_ts].remove(message)
            self.refresh_parent(parent_ts)

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
        return sorted(self.by_ts.values(), key=message_key)


class Emulator:
    """The live workspace: conversations, tokens, OAuth codes, fault state and request log."""

    def __init__(self, workspace: SlackExport, config: EmulatorConfig) -> None:
        self.config = config
        self.workspace = workspace
        self.workspace_id = workspace.workspace_id or DEFAULT_WORKSPACE_ID
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

    # -- answering calls

    def call(self, method: str, params: Params, token: str | None) -> Reply:
        """Answer one Web API call and log it."""
        token = token or params.get("token")
        reply = self._answer(method, params, token)
        self.request_log.append(LoggedRequest(method, params, reply.status, token))
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

    # -- what a caller may see

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

    def readable(self, params: Params, who: Identity) -> Conversation:
        """The conversation named by `channel`, if the caller may read and write it."""
        conversation = self.conversation(params, who)
        if not self.is_member(conversation, who):
            raise SlackError("not_in_channel")
        return conversation

    def direct_message(self, user_id: str) -> Conversation:
        """The app's DM with a person (`D` + their id without its `U`), opened on first use."""
        dm_id = "D" + user_id[1:]
        if dm_id not in self.conversations:
            info = {"id": dm_id, "is_im": True, "user": user_id, "created": int(time.time())}
            self.conversations[dm_id] = Conversation(info, [])
            self.members.add(dm_id)
        return self.conversations[dm_id]

    def user(self, user_id: str | None) -> SlackDict | None:
        return next((user for user in self.users if user["id"] == user_id), None)

    # -- what the workspace hands out

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


def route(workspaces: Sequence[Emulator], params: Params, token: str | None) -> Emulator:
    """The workspace a call is for: the one that issued its token (or, for
    oauth.v2.access, its code); else the first, which answers as Slack does to a call
    without a valid token."""
    token = token or params.get("token")
    code = params.get("code")
    for workspace in workspaces:
        if token in workspace.tokens or code in workspace.oauth_codes:
            return workspace
    return workspaces[0]
