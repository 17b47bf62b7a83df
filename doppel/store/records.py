"""Slack-shaped dicts (from the Web API or an export) to store rows, and their upserts.

Both ingestion paths go through these functions, so a workspace read from an export
and the same workspace scraped over the API end up as identical rows. Each write of
messages, users or channels also raises the workspace's `data_version`, in the same
transaction, so what was computed from the old rows is known to be stale.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from doppel.store.database import upsert
from doppel.store.models import Channel, Message, User, Workspace, utcnow
from doppel.types import SlackDict

MESSAGE_FIELDS = (
    "thread_ts",
    "user_id",
    "subtype",
    "bot_id",
    "text",
    "edited_ts",
    "reply_count",
    "latest_reply",
)


def channel_kind(channel: SlackDict) -> str:
    if channel.get("is_im"):
        return "im"
    if channel.get("is_mpim"):
        return "mpim"
    if channel.get("is_private") or channel.get("is_group"):
        return "private_channel"
    return "public_channel"


def channel_row(workspace_id: str, channel: SlackDict) -> dict[str, Any]:
    topic = channel.get("topic") or {}
    purpose = channel.get("purpose") or {}
    return {
        "workspace_id": workspace_id,
        "id": channel["id"],
        "name": channel.get("name") or channel.get("user") or channel["id"],
        "kind": channel_kind(channel),
        "is_archived": bool(channel.get("is_archived")),
        "topic": topic.get("value") if isinstance(topic, dict) else str(topic),
        "purpose": purpose.get("value") if isinstance(purpose, dict) else str(purpose),
    }


def user_row(workspace_id: str, user: SlackDict) -> dict[str, Any]:
    profile = user.get("profile") or user.get("user_profile") or {}
    return {
        "workspace_id": workspace_id,
        "id": user["id"],
        "name": user.get("name") or profile.get("name"),
        "display_name": profile.get("display_name") or None,
        "real_name": user.get("real_name") or profile.get("real_name") or None,
        "is_bot": bool(user.get("is_bot")) or user["id"] == "USLACKBOT",
        "deleted": bool(user.get("deleted")),
        "avatar_url": profile.get("image_192") or profile.get("image_72"),
    }


def message_row(workspace_id: str, channel_id: str, message: SlackDict) -> dict[str, Any]:
    edited = message.get("edited") or {}
    return {
        "workspace_id": workspace_id,
        "channel_id": channel_id,
        "ts": message["ts"],
        "thread_ts": message.get("thread_ts"),
        "user_id": message.get("user"),
        "subtype": message.get("subtype"),
        "bot_id": message.get("bot_id") or None,
        "text": message.get("text") or "",
        "edited_ts": edited.get("ts"),
        "reply_count": int(message.get("reply_count") or 0),
        "latest_reply": message.get("latest_reply"),
    }


def save_workspace(session: Session, workspace_id: str, name: str | None) -> None:
    update = ["updated_at"] + (["name"] if name else [])
    upsert(session, Workspace, [{"id": workspace_id, "name": name, "updated_at": utcnow()}], update)


def save_channels(session: Session, workspace_id: str, channels: list[SlackDict]) -> None:
    rows = [channel_row(workspace_id, channel) for channel in channels]
    upsert(session, Channel, rows, ["name", "kind", "is_archived", "topic", "purpose"])
    _changed(session, workspace_id, rows)


def save_users(session: Session, workspace_id: str, users: list[SlackDict]) -> None:
    rows = [user_row(workspace_id, user) for user in users]
    upsert(
        session,
        User,
        rows,
        ["name", "display_name", "real_name", "is_bot", "deleted", "avatar_url"],
    )
    _changed(session, workspace_id, rows)


def save_messages(
    session: Session, workspace_id: str, channel_id: str, messages: list[SlackDict]
) -> None:
    """Upsert on (workspace, channel, ts): re-ingesting is a no-op, edits update the text."""
    rows = [message_row(workspace_id, channel_id, message) for message in messages]
    upsert(session, Message, rows, MESSAGE_FIELDS)
    _changed(session, workspace_id, rows)


def _changed(session: Session, workspace_id: str, rows: list[dict[str, Any]]) -> None:
    """Raise the workspace's `data_version` when rows were written."""
    if rows:
        session.execute(
            update(Workspace)
            .where(Workspace.id == workspace_id)
            .values(data_version=Workspace.data_version + 1)
        )
