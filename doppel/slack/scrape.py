"""Incremental, resumable scraping of a workspace through the Slack Web API.

Every page is stored together with the cursor that says how far we got, in one
transaction. So a crash loses at most the page in flight, a rerun continues exactly
below the last stored page, and the next run after a finished one fetches only what
is new (plus a look-back window, to notice threads whose `latest_reply` moved).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from doppel.config import Settings, SlackSettings
from doppel.errors import DoppelError
from doppel.slack.ratelimit import MethodRateLimiter
from doppel.store.database import Database
from doppel.store.models import Message, ScrapeCursor, utcnow
from doppel.store.records import save_channels, save_messages, save_users, save_workspace
from doppel.types import SlackDict

AUTH_ERRORS = {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired"}
CHANNEL_ERRORS = {"channel_not_found", "not_in_channel", "is_archived", "missing_scope"}
LIST_METHODS = ("conversations.list", "users.list")
HISTORY_METHODS = ("conversations.history", "conversations.replies")
ProgressCallback = Callable[[int], None]  # called with the number of messages just stored


class ChannelUnavailable(DoppelError):
    """A channel we may not read: gone, private, or the bot is not a member."""


def make_client(settings: Settings, token: str) -> WebClient:
    """A slack-sdk client that retries dropped connections, 5xx and 429 (honouring
    Retry-After). Which token reads which workspace is `doppel.slack.tokens`' business."""
    retries = settings.slack.max_retries
    return WebClient(
        token=token,
        base_url=settings.slack_api_url.rstrip("/") + "/",
        timeout=settings.slack.timeout_seconds,
        retry_handlers=[
            ConnectionErrorRetryHandler(max_retry_count=retries),
            RateLimitErrorRetryHandler(max_retry_count=retries),
            ServerErrorRetryHandler(max_retry_count=retries),
        ],
    )


def make_rate_limiter(settings: SlackSettings) -> MethodRateLimiter:
    rates = {method: settings.rates.lists_per_minute for method in LIST_METHODS}
    rates |= {method: settings.history_rate() for method in HISTORY_METHODS}
    rates["conversations.join"] = settings.rates.join_per_minute
    return MethodRateLimiter(rates)


@dataclass
class ChannelResult:
    channel_id: str
    name: str
    messages: int = 0  # message records stored by this run (history and replies)
    threads: int = 0  # threads whose replies were fetched
    skipped: str | None = None  # why the channel could not be read


@dataclass
class SlackScraper:
    """Reads one workspace into the store; safe to share between threads."""

    client: WebClient
    db: Database
    settings: SlackSettings
    limiter: MethodRateLimiter
    workspace_id: str = field(default="", init=False)

    # -- plumbing -------------------------------------------------------------------

    def _call(self, method: str, **params: Any) -> SlackDict:
        self.limiter.wait(method)
        clean = {key: value for key, value in params.items() if value is not None}
        try:
            return self.client.api_call(method, params=clean).data  # type: ignore[return-value]
        except SlackApiError as error:
            code = error.response.get("error", "unknown_error")
            if code in AUTH_ERRORS:
                raise DoppelError(
                    f"Slack rejected the token ({code}) calling {method}",
                    "check SLACK_BOT_TOKEN / SLACK_USER_TOKEN and SLACK_API_URL, or reinstall "
                    "the app in the workspace (OAuth)",
                ) from None
            if code in CHANNEL_ERRORS:
                raise ChannelUnavailable(
                    f"cannot read channel {params.get('channel')}: {code}",
                    "invite the bot, pass --join, or use a user token",
                ) from None
            raise

    def _pages(self, method: str, **params: Any) -> Iterator[SlackDict]:
        """Follow `response_metadata.next_cursor` until Slack says there is no more."""
        cursor = None
        while True:
            page = self._call(method, cursor=cursor, **params)
            yield page
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return

    # -- workspace, channels, users --------------------------------------------------

    def connect(self, expected: str | None = None) -> str:
        """Check the token and record the workspace it belongs to, which must be `expected`
        when given: a workspace is never read with another's token."""
        identity = self._call("auth.test")
        if expected is not None and identity["team_id"] != expected:
            raise DoppelError(
                f"the Slack token given for workspace {expected} belongs to workspace "
                f"{identity['team_id']}",
                f"install the app in {expected}, or set SLACK_BOT_TOKEN to a token of it",
            )
        self.workspace_id = identity["team_id"]
        with self.db.transaction() as session:
            save_workspace(session, self.workspace_id, identity.get("team"))
        return self.workspace_id

    def sync_channels(self, only: list[str] | None = None) -> list[SlackDict]:
        """Store the channel list; return the ones to scrape (all, or those named)."""
        types = "public_channel"
        if self.settings.include_private:
            types += ",private_channel,mpim,im"
        channels: list[SlackDict] = []
        for page in self._pages(
            "conversations.list",
            types=types,
            exclude_archived=not self.settings.include_archived,
            limit=200,
        ):
            channels.extend(page.get("channels", []))
        with self.db.transaction() as session:
            save_channels(session, self.workspace_id, channels)
        if not only:
            return channels
        by_key = {c["id"]: c for c in channels} | {c.get("name"): c for c in channels}
        unknown = [name for name in only if name.lstrip("#") not in by_key]
        if unknown:
            known = ", ".join(sorted(c.get("name") or c["id"] for c in channels))
            raise DoppelError(
                f"unknown or unreadable channel(s): {', '.join(unknown)}",
                f"channels visible to this token: {known}",
            )
        return [by_key[name.lstrip("#")] for name in only]

    def sync_users(self) -> int:
        users: list[SlackDict] = []
        for page in self._pages("users.list", limit=200):
            users.extend(page.get("members", []))
        with self.db.transaction() as session:
            save_users(session, self.workspace_id, users)
        return len(users)

    # -- one channel -----------------------------------------------------------------

    def scrape_channel(
        self, channel: SlackDict, progress: ProgressCallback | None = None
    ) -> ChannelResult:
        """Bring one channel's history and threads up to date."""
        result = ChannelResult(channel["id"], channel.get("name") or channel["id"])
        report = progress or (lambda _n: None)
        try:
            if self.settings.join_channels and _joinable(channel):
                self._call("conversations.join", channel=channel["id"])
            result.messages += self._sync_history(channel["id"], report)
            for parent_ts, since in self._stale_threads(channel["id"]):
                result.messages += self._sync_replies(channel["id"], parent_ts, since, report)
                result.threads += 1
        except ChannelUnavailable as error:
            result.skipped = error.message
        return result

    def _cursor(self, channel_id: str) -> ScrapeCursor:
        with self.db.session() as session:
            cursor = session.get(ScrapeCursor, (self.workspace_id, channel_id))
        return cursor or ScrapeCursor(workspace_id=self.workspace_id, channel_id=channel_id)

    def _sync_history(self, channel_id: str, report: ProgressCallback) -> int:
        cursor = self._cursor(channel_id)
        if cursor.run_newest is None:  # start a new run: everything after the look-back point
            cursor.run_from = _minus_days(cursor.synced_through, self.settings.thread_lookback_days)
            cursor.run_before = None
        stored = 0
        for page in self._pages(
            "conversations.history",
            channel=channel_id,
            oldest=cursor.run_from,
            latest=cursor.run_before,
            limit=self.settings.page_size(),
        ):
            messages = page.get("messages", [])
            if messages:
                cursor.run_newest = cursor.run_newest or messages[0]["ts"]
                cursor.run_before = messages[-1]["ts"]
            self._store_page(channel_id, messages, cursor)
            stored += len(messages)
            report(len(messages))
        if cursor.run_newest is not None:
            cursor.synced_through = max(cursor.synced_through or "", cursor.run_newest)
        cursor.run_from = cursor.run_newest = cursor.run_before = None
        self._store_page(channel_id, [], cursor)
        return stored

    def _store_page(self, channel_id: str, messages: list[SlackDict], cursor: ScrapeCursor) -> None:
        """Messages and the cursor that covers them commit together, or not at all."""
        with self.db.transaction() as session:
            save_messages(session, self.workspace_id, channel_id, messages)
            cursor.updated_at = utcnow()
            session.merge(cursor)

    def _stale_threads(self, channel_id: str) -> list[tuple[str, str | None]]:
        """Parents whose `latest_reply` is newer than the replies we hold."""
        with self.db.session() as session:
            rows = session.execute(
                select(Message.ts, Message.replies_synced_ts)
                .where(
                    Message.workspace_id == self.workspace_id,
                    Message.channel_id == channel_id,
                    Message.reply_count > 0,
                    Message.thread_ts == Message.ts,
                    (Message.replies_synced_ts.is_(None))
                    | (Message.latest_reply > Message.replies_synced_ts),
                )
                .order_by(Message.ts)
            )
            return [(row.ts, row.replies_synced_ts) for row in rows]

    def _sync_replies(
        self, channel_id: str, parent_ts: str, since: str | None, report: ProgressCallback
    ) -> int:
        """Fetch replies after `since`, oldest first, recording progress page by page.

        At the end the thread counts as synced up to the parent's `latest_reply`, so a
        deleted reply does not make us refetch the thread on every run.
        """
        stored = 0
        synced = since
        for page in self._pages(
            "conversations.replies",
            channel=channel_id,
            ts=parent_ts,
            oldest=since,
            limit=self.settings.page_size(),
        ):
            messages = page.get("messages", [])
            for message in messages:
                if message["ts"] == parent_ts:
                    synced = max(synced or "", message.get("latest_reply") or "") or None
            newest = max((m["ts"] for m in messages if m["ts"] != parent_ts), default=since)
            with self.db.transaction() as session:
                save_messages(session, self.workspace_id, channel_id, messages)
                self._mark_replies_synced(session, channel_id, parent_ts, newest)
            stored += len(messages)
            report(len(messages))
        with self.db.transaction() as session:
            self._mark_replies_synced(session, channel_id, parent_ts, synced)
        return stored

    def _mark_replies_synced(
        self, session: Session, channel_id: str, parent_ts: str, synced: str | None
    ) -> None:
        if synced is None:
            return
        session.execute(
            update(Message)
            .where(
                Message.workspace_id == self.workspace_id,
                Message.channel_id == channel_id,
                Message.ts == parent_ts,
            )
            .values(replies_synced_ts=synced)
        )


def _joinable(channel: SlackDict) -> bool:
    return not channel.get("is_member", True) and not channel.get("is_private")


def _minus_days(ts: str | None, days: float) -> str | None:
    if ts is None:
        return None
    return f"{max(0.0, float(ts) - days * 86400):.6f}"
