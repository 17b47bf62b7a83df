"""The `doppel` command line: one module per command group, all on one Typer app.

Heavy imports (Prefect, FastAPI, datasets) happen inside the commands that need them,
so `doppel --help` stays instant. The CLI is the one part of `doppel/` that may reach
up into `flows/`, `serving/` and `devtools/`, and it does so lazily.
"""

from __future__ import annotations

import sys

# Importing a command group's module registers its commands on `app`.
from doppel.cli import consent, data, db, dev, ingest, models, secrets, serve  # noqa: F401
from doppel.cli.common import app
from doppel.errors import DoppelError
from doppel.progress import console

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point: user-facing errors print as one line, not a traceback."""
    try:
        app()
    except DoppelError as error:
        console.print(f"[bold red]error:[/] {error.message}")
        if error.hint:
            console.print(f"[yellow]hint:[/] {error.hint}")
        sys.exit(1)
