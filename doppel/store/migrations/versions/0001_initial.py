"""The initial schema: the message store and the Slack app's state.

It is exactly what the store's engine created straight from the models before it had
migrations; `doppel.store.schema` recognises such databases and stamps them instead.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 03:54:46
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    # -- The message store ---------------------------------------------------------
    op.create_table(
        "workspaces",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "channels",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("is_archived", sa.Boolean(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=True),
        sa.Column("purpose", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("workspace_id", "id"),
    )
    op.create_table(
        "users",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("display_name", sa.String(255), nullable=True),
        sa.Column("real_name", sa.String(255), nullable=True),
        sa.Column("is_bot", sa.Boolean(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("avatar_url", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("workspace_id", "id"),
    )
    op.create_table(
        "messages",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("channel_id", sa.String(32), nullable=False),
        sa.Column("ts", sa.String(32), nullable=False),
        sa.Column("thread_ts", sa.String(32), nullable=True),
        sa.Column("user_id", sa.String(32), nullable=True),
        sa.Column("subtype", sa.String(64), nullable=True),
        sa.Column("bot_id", sa.String(32), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("edited_ts", sa.String(32), nullable=True),
        sa.Column("reply_count", sa.Integer(), nullable=False),
        sa.Column("latest_reply", sa.String(32), nullable=True),
        sa.Column("replies_synced_ts", sa.String(32), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("workspace_id", "channel_id", "ts"),
    )
    op.create_index("ix_messages_user", "messages", ["workspace_id", "user_id"])
    op.create_index("ix_messages_thread", "messages", ["workspace_id", "channel_id", "thread_ts"])
    op.create_table(
        "scrape_cursors",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("channel_id", sa.String(32), nullable=False),
        sa.Column("synced_through", sa.String(32), nullable=True),
        sa.Column("run_from", sa.String(32), nullable=True),
        sa.Column("run_newest", sa.String(32), nullable=True),
        sa.Column("run_before", sa.String(32), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("workspace_id", "channel_id"),
    )

    # -- The Slack app's state: no foreign keys, the app may come before any ingest --
    op.create_table(
        "enrollments",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.Column("changed_by", sa.String(255), nullable=False),
        sa.Column("changed_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "user_id"),
    )
    op.create_table(
        "active_personas",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("channel_id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("set_by", sa.String(255), nullable=False),
        sa.Column("set_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "channel_id"),
    )
    op.create_table(
        "workspace_limits",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("max_enrolled", sa.Integer(), nullable=True),
        sa.Column("trainings_per_day", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("workspace_id"),
    )
    op.create_table(
        "slack_events",
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_index("ix_slack_events_received", "slack_events", ["received_at"])
    op.create_table(
        "training_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(32), nullable=False),
        sa.Column("requested_by", sa.String(32), nullable=False),
        sa.Column("requested_at", TIMESTAMP, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("flow_run", sa.String(64), nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_training_requests_ws", "training_requests", ["workspace_id", "requested_at"]
    )


def downgrade() -> None:
    for index, table in (
        ("ix_training_requests_ws", "training_requests"),
        ("ix_slack_events_received", "slack_events"),
        ("ix_messages_thread", "messages"),
        ("ix_messages_user", "messages"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "training_requests",
        "slack_events",
        "workspace_limits",
        "active_personas",
        "enrollments",
        "scrape_cursors",
        "messages",
        "users",
        "channels",
        "workspaces",
    ):
        op.drop_table(table)
