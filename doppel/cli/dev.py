"""`doppel synth` and `doppel slack-emulator`: the developer tools, for demos and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from doppel.cli.common import app
from doppel.progress import console


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Where to write the export .zip.")],
    users: Annotated[int, typer.Option(min=2, help="People in the workspace.")] = 8,
    days: Annotated[int, typer.Option(min=1, help="Days of history.")] = 30,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
) -> None:
    """Write a deterministic synthetic workspace as a valid Slack export."""
    from devtools.synth import generate_workspace, write_export

    workspace = generate_workspace(users=users, days=days, seed=seed)
    path = write_export(workspace, out)
    messages = sum(len(m) for m in workspace.messages.values())
    console.print(
        f"wrote {path}: {len(workspace.users)} users, {len(workspace.channels)} channels, "
        f"{messages} messages (team {workspace.workspace_id})"
    )


@app.command("slack-emulator")
def slack_emulator(
    export: Annotated[Path, typer.Option(help="Slack export (.zip or folder) to serve.")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    rate_limit: Annotated[
        int | None, typer.Option(help="Requests per method per minute before 429s.")
    ] = None,
    fail_rate: Annotated[float, typer.Option(min=0, max=1, help="Share of 5xx answers.")] = 0.0,
    latency: Annotated[float, typer.Option(min=0, help="Seconds added to every answer.")] = 0.0,
    bot_user: Annotated[str, typer.Option(help="User id of the app's bot user.")] = "UDOPPELBOT",
) -> None:
    """Serve a Slack export as a Slack Web API on 127.0.0.1 (for demos and tests)."""
    from devtools.emulator import run_emulator

    run_emulator(
        export,
        port=port,
        rate_limit_per_minute=rate_limit,
        fail_rate=fail_rate,
        latency_seconds=latency,
        bot_user=bot_user,
    )
