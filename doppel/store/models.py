"""SQLAlchemy 2 models of a Slack workspace, as DoppelBot stores it.

Slack timestamps (`ts`) stay strings: they are ids as much as times, and their
fixed-width form ("1433866202.000002") sorts correctly as text.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base class of every DoppelBot table."""


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # Slack's team_id
    name: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Goes up with every write of its messages, users or channels (`store.records`), so
    # that what was computed from them (`SampleCounts`) knows when it is out of date.
    data_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Channel(Base):
    __tablename__ = "channels"

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))  # public_channel, private_channel, im, mpim
    is_archived: Mapped[bool] = mapped_column(Boolean, default=False)
    topic: Mapped[str | None] = mapped_column(Text)
    purpose: Mapped[str | None] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(255))
    display_name: Mapped[str | None] = mapped_column(String(255))
    real_name: Mapped[str | None] = mapped_column(String(255))
    is_bot: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    avatar_url: Mapped[str | None] = mapped_column(Text)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_user", "workspace_id", "user_id"),
        Index("ix_messages_thread", "workspace_id", "channel_id", "thread_ts"),
    )

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    ts: Mapped[str] = mapped_column(String(32), primary_key=True)
    thread_ts: Mapped[str | None] = mapped_column(String(32))
    user_id: Mapped[str | None] = mapped_column(String(32))
    subtype: Mapped[str | None] = mapped_column(String(64))
    bot_id: Mapped[str | None] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text, default="")
    edited_ts: Mapped[str | None] = mapped_column(String(32))
    reply_count: Mapped[int] = mapped_column(Integer, default=0)
    latest_reply: Mapped[str | None] = mapped_column(String(32))
    # Scraper bookkeeping on thread parents: replies up to this `latest_reply` are stored.
    replies_synced_ts: Mapped[str | None] = mapped_column(String(32))


class ScrapeCursor(Base):
    """How far the Web API scrape of one channel got, so runs are incremental and resumable.

    Every message with ts <= `synced_through` is stored. A run reads the window after
    `run_from` newest first; while it is unfinished, everything in (`run_before`,
    `run_newest`] is stored, and a resumed run continues below `run_before` instead of
    fetching those pages again.
    """

    __tablename__ = "scrape_cursors"

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    synced_through: Mapped[str | None] = mapped_column(String(32))
    run_from: Mapped[str | None] = mapped_column(String(32))
    run_newest: Mapped[str | None] = mapped_column(String(32))
    run_before: Mapped[str | None] = mapped_column(String(32))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SampleCounts(Base):
    """Each person's sample count, as a dataset build would find it, for `doppel users`.

    Counting means segmenting the whole workspace, which takes half a minute at 1M
    messages, so it is done after each ingest and kept here with the `fingerprint` of
    everything it depends on (the workspace's `data_version`, the dataset rules, who opted
    out); a stale row is never read (`doppel.dataset.counts`).
    """

    __tablename__ = "sample_counts"

    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id"), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    counts: Mapped[dict[str, int]] = mapped_column(JSON)  # user id -> samples
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


# -- The Slack app's state, per workspace ----------------------------------------------
# No foreign keys to `workspaces`: the app is often installed before anything is ingested.


class Enrollment(Base):
    """A person's consent: only people who opted in are trained or impersonated.

    A revoked row is kept (not deleted) so that their messages stay out of every dataset,
    even after a re-ingest brings them back into the store.
    """

    __tablename__ = "enrollments"

    workspace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    granted: Mapped[bool] = mapped_column(Boolean)
    changed_by: Mapped[str] = mapped_column(String(255))  # a Slack user id, or "cli:<login>"
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ActivePersona(Base):
    """Who answers mentions: per channel, or workspace-wide (`channel_id` "*")."""

    __tablename__ = "active_personas"

    workspace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    channel_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(32))
    set_by: Mapped[str] = mapped_column(String(255))
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorkspaceLimits(Base):
    """An operator's limits for one workspace; absent values fall back to the settings."""

    __tablename__ = "workspace_limits"

    workspace_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    max_enrolled: Mapped[int | None] = mapped_column(Integer)
    trainings_per_day: Mapped[int | None] = mapped_column(Integer)


class SlackEvent(Base):
    """Events already handled, so that Slack's retries never cause a second reply."""

    __tablename__ = "slack_events"
    __table_args__ = (Index("ix_slack_events_received", "received_at"),)

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainingRequest(Base):
    """A `/doppel train` request and how it went, for `/doppel status` and the daily limit."""

    __tablename__ = "training_requests"
    __table_args__ = (Index("ix_training_requests_ws", "workspace_id", "requested_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    workspace_id: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(32))
    requested_by: Mapped[str] = mapped_column(String(32))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default="queued")  # running, done, failed
    detail: Mapped[str | None] = mapped_column(Text)  # the outcome, or the error
    flow_run: Mapped[str | None] = mapped_column(String(64))  # Prefect flow run id, if any
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
