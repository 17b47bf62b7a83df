"""SQLAlchemy 2 models of a Slack workspace, as DoppelBot stores it.

Slack timestamps (`ts`) stay strings: they are ids as much as times, and their
fixed-width form ("1433866202.000002") sorts correctly as text.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Base class of every DoppelBot table."""


class Workspace(Base):
    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # Slack team_id
    name: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


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
