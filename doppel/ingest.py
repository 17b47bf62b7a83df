"""Putting a Slack export into the store as one transaction."""

from __future__ import annotations

import re
from pathlib import Path

from doppel.config import ExportSettings
from doppel.errors import DoppelError
from doppel.slack.export import SlackExport, read_export
from doppel.store.database import Database, workspace_counts
from doppel.store.records import save_channels, save_messages, save_users, save_workspace


def ingest_export(
    db: Database,
    path: Path,
    *,
    workspace: str | None = None,
    include_private: bool = False,
    max_bytes: int | None = None,
    limits: ExportSettings | None = None,
) -> dict[str, object]:
    """Read and validate the whole export first, then write it in one transaction.

    `limits` are the `export:` settings (`max_bytes` overrides their `max_unzipped_mb`).
    Returns the workspace totals in the store afterwards.
    """
    export = read_export(path, include_private=include_private, max_bytes=max_bytes, limits=limits)
    workspace_id = _workspace_id(export, workspace, path)
    with db.transaction() as session:
        save_workspace(session, workspace_id, Path(path).stem)
        save_users(session, workspace_id, export.users)
        save_channels(session, workspace_id, export.channels)
        for channel_id, messages in export.messages.items():
            save_messages(session, workspace_id, channel_id, messages)
    with db.session() as session:
        return {"workspace": workspace_id, **workspace_counts(session, workspace_id)}


WORKSPACE_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # Slack's team ids, as the store holds them


def _workspace_id(export: SlackExport, workspace: str | None, path: Path) -> str:
    if workspace is not None and not WORKSPACE_ID.fullmatch(workspace):
        raise DoppelError(
            f"--workspace {workspace!r} is not a Slack workspace id",
            "pass the id Slack gives the workspace, e.g. T01234567",
        )
    if export.workspace_id and workspace and workspace != export.workspace_id:
        raise DoppelError(
            f"{path} belongs to workspace {export.workspace_id}, not '{workspace}'",
            f"drop --workspace or pass --workspace {export.workspace_id}",
        )
    workspace_id = export.workspace_id or workspace
    if not workspace_id:
        raise DoppelError(
            f"{path} does not say which workspace it is from (no team_id in users.json)",
            "pass --workspace TEAM_ID (e.g. T01234567)",
        )
    return workspace_id
