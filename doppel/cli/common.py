"""What every command group shares: the Typer apps, common options and small helpers."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from doppel.config import Settings

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="DoppelBot: learn how a person writes on Slack and answer in their voice.",
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print a JSON object as the last line.")]
WorkspaceOption = Annotated[
    str | None, typer.Option("--workspace", help="Workspace id or name (needed when several).")
]
UserOption = Annotated[str, typer.Option("--user", help="User id, name, display or real name.")]


def emit(result: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=str))


def prefect_env(settings: Settings) -> None:
    """Keep Prefect's state under DOPPEL_HOME and off the network, unless configured."""
    prefect_home = (settings.home / "prefect").resolve()
    prefect_home.mkdir(parents=True, exist_ok=True)  # its server cannot start without it
    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # A first run creates Prefect's database; on 2 cores that outlasts the 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
