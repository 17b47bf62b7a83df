"""Sample counts kept per workspace, and the data version that says when they are stale.

`doppel users` read every message of a workspace to count each person's samples (22 s
at 1M messages); it now reads `sample_counts`, written after each ingest, as long as its
fingerprint (which includes `workspaces.data_version`) still matches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:12:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "workspaces", sa.Column("data_version", sa.Integer(), server_default="0", nullable=False)
    )
    op.create_table(
        "sample_counts",
        sa.Column("workspace_id", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("counts", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"]),
        sa.PrimaryKeyConstraint("workspace_id"),
    )


def downgrade() -> None:
    op.drop_table("sample_counts")
    with op.batch_alter_table("workspaces") as batch:
        batch.drop_column("data_version")
