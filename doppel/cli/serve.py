"""`doppel serve` and `doppel slack-app`: the model API and the Slack app."""

from __future__ import annotations

from typing import Annotated

import typer

from doppel.cli.common import app
from doppel.config import get_settings
from doppel.errors import DoppelError
from doppel.progress import console


@app.command("slack-app")
def slack_app(
    serving_url: Annotated[
        str | None, typer.Option(help="The model API (default: DOPPEL_SERVING_URL).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
) -> None:
    """Run the Slack app alone, calling the model API over HTTP (see README, Slack app)."""
    import uvicorn

    from serving.slack import standalone_app

    settings = get_settings()
    model_api = serving_url or settings.serving_url
    console.print(f"Slack app on http://{host}:{port}/slack/events, model API {model_api}")
    uvicorn.run(standalone_app(settings, model_api), host=host, port=port)


@app.command()
def serve(
    engine: Annotated[
        str | None, typer.Option(help="vllm or transformers (default: serve.engine, auto).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Serve every person's production adapter over an OpenAI-style API (and the Slack app)."""
    import uvicorn

    from serving.api import create_app

    if engine not in (None, "auto", "vllm", "transformers"):
        raise DoppelError(f"unknown engine '{engine}'", "use vllm or transformers")
    settings = get_settings()
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    app = create_app(settings, engine, self_url=f"http://{local}:{port}")
    slack = "with the Slack app at /slack/events" if app.state.slack else "no Slack app"
    kind = engine or settings.serve.engine
    console.print(f"serving on http://{host}:{port} (engine: {kind}; {slack})")
    uvicorn.run(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=30,  # in-flight completions get this long to finish
        log_level="warning",
    )
