"""`doppel serve` and `doppel slack-app`: the model API and the Slack app.

Both listen on 127.0.0.1 unless told otherwise, and refuse any other address until they
are locked: the model API with `serve.api_keys`, the Slack app with its signing secret
(inbound, checked by Bolt) and a model API key (outbound: a model API that another host
can reach is itself keyed, since `doppel serve` refuses to run it open).
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from doppel.cli.common import app
from doppel.config import get_settings
from doppel.errors import DoppelError
from doppel.progress import console

KEYS_HINT = "set DOPPEL_SERVE__API_KEYS=<key>[,<key>...] (serve.api_keys), or keep --host 127.0.0.1"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: addresses no other machine can reach."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@app.command("slack-app")
def slack_app(
    serving_url: Annotated[
        str | None, typer.Option(help="The model API (default: DOPPEL_SERVING_URL).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on; others need credentials set.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
) -> None:
    """Run the Slack app alone, calling the model API over HTTP (see README, Slack app)."""
    import uvicorn

    from serving.slack import standalone_app
    from serving.slack.model_client import model_api_key

    settings = get_settings()
    missing = [
        name
        for name, value in (
            ("SLACK_SIGNING_SECRET", settings.slack_signing_secret),
            ("DOPPEL_SLACK_APP__MODEL_API_KEY", model_api_key(settings)),
        )
        if not value
    ]
    if missing and not is_loopback(host):
        raise DoppelError(
            f"refusing to listen on {host} without {' and '.join(missing)}",
            "set SLACK_SIGNING_SECRET=<your app's signing secret> and "
            "DOPPEL_SLACK_APP__MODEL_API_KEY=<one of the model API's DOPPEL_SERVE__API_KEYS>, "
            "or keep --host 127.0.0.1",
        )
    model_api = serving_url or settings.serving_url
    console.print(f"Slack app on http://{host}:{port}/slack/events, model API {model_api}")
    uvicorn.run(standalone_app(settings, model_api), host=host, port=port)


@app.command()
def serve(
    engine: Annotated[
        str | None, typer.Option(help="vllm or transformers (default: serve.engine, auto).")
    ] = None,
    host: Annotated[
        str, typer.Option(help="Interface to listen on; others need serve.api_keys set.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
) -> None:
    """Serve every person's production adapter over an OpenAI-style API (and the Slack app)."""
    if engine not in (None, "auto", "vllm", "transformers"):
        raise DoppelError(f"unknown engine '{engine}'", "use vllm or transformers")
    settings = get_settings()
    if not settings.serve.api_keys and not is_loopback(host):
        raise DoppelError(
            f"refusing to serve the model API on {host} without an API key: "
            "anyone who reaches it could speak as every persona",
            KEYS_HINT,
        )
    import uvicorn

    from serving.api import create_app

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
