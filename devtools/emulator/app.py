"""The emulator over HTTP: Slack's `/api/{method}` route plus helper endpoints for tests.

Helpers outside Slack's API make the state easy to check: `GET /emulator/messages/{channel}`,
`GET /emulator/requests`, `GET /emulator/oauth/authorize` (Slack's consent screen with
"Allow" already clicked) and `/emulator/responses/{key}` (a slash command's
`response_url`: POST to answer, GET to read the answers). With several workspaces, API
calls go to the workspace of their token, and the helpers take `?team=T...` (default:
the first workspace), as Slack's consent screen does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from devtools.emulator import methods  # noqa: F401  (registers the Web API methods)
from devtools.emulator.state import (
    Emulator,
    EmulatorConfig,
    LoggedRequest,
    Params,
    SlackError,
    route,
)
from doppel.config import ExportSettings
from doppel.slack.export import SlackExport, read_export

router = APIRouter()


async def _request_params(request: Request) -> tuple[Params, str | None]:
    """Query, form or JSON params, plus the Bearer token; Basic auth carries OAuth clients."""
    params: Params = dict(request.query_params)
    body = await request.body()
    if body.strip():
        if "json" in request.headers.get("content-type", ""):
            try:
                decoded = json.loads(body)
            except json.JSONDecodeError:
                raise SlackError("invalid_json") from None
            if not isinstance(decoded, dict):
                raise SlackError("invalid_json")
            params.update(decoded)
        else:
            params.update(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            client_id, _, secret = base64.b64decode(credentials).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise SlackError("invalid_client_id") from None
        params.setdefault("client_id", client_id)
        params.setdefault("client_secret", secret)
    return params, credentials.strip() if scheme.lower() == "bearer" else None


def _emulator(request: Request) -> Emulator:
    """The workspace named by `?team=`, else the first."""
    workspaces: list[Emulator] = request.app.state.emulators
    team = request.query_params.get("team")
    return next((w for w in workspaces if w.workspace_id == team), workspaces[0])


@router.api_route("/api/{method}", methods=["GET", "POST"])
async def web_api(method: str, request: Request) -> JSONResponse:
    try:
        params, token = await _request_params(request)
    except SlackError as error:
        _emulator(request).request_log.append(LoggedRequest(method, {}, error.status))
        return JSONResponse({"ok": False, "error": error.error}, status_code=error.status)
    emulator = route(request.app.state.emulators, params, token)
    if emulator.config.latency_seconds > 0:
        await asyncio.sleep(emulator.config.latency_seconds)
    reply = emulator.call(method, params, token)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


@router.get("/emulator/oauth/authorize")
async def oauth_authorize(request: Request) -> Response:
    """Slack's consent screen after "Allow": redirect back with a code and the state."""
    params = dict(request.query_params)
    try:
        code = _emulator(request).authorize(params)
    except SlackError as error:
        return JSONResponse({"ok": False, "error": error.error}, status_code=error.status)
    answer = {"code": code, **({"state": params["state"]} if "state" in params else {})}
    parts = urlsplit(params["redirect_uri"])
    query = f"{parts.query}&{urlencode(answer)}" if parts.query else urlencode(answer)
    return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)


@router.post("/emulator/responses/{key}")
async def response_url(key: str, request: Request) -> JSONResponse:
    """A slash command's `response_url`: what an app posts here is kept for tests."""
    try:
        message = json.loads(await request.body())
    except json.JSONDecodeError:
        return JSONResponse({"ok": False, "error": "invalid_json"}, status_code=400)
    _emulator(request).responses.setdefault(key, []).append(message)
    return JSONResponse({"ok": True})


@router.get("/emulator/responses/{key}")
async def responses(key: str, request: Request) -> JSONResponse:
    """Every message posted to one `response_url`, oldest first."""
    return JSONResponse(_emulator(request).responses.get(key, []))


@router.get("/emulator/messages/{channel}")
async def channel_messages(channel: str, request: Request) -> JSONResponse:
    """Every message of a channel, replies included, oldest first."""
    conversation = _emulator(request).conversations.get(channel)
    if conversation is None:
        return JSONResponse({"ok": False, "error": "channel_not_found"}, status_code=404)
    return JSONResponse(conversation.all_messages())


@router.get("/emulator/requests")
async def logged_requests(request: Request) -> list[dict[str, Any]]:
    return [{"method": e.method, "status": e.status} for e in _emulator(request).request_log]


def create_app(
    workspace: SlackExport,
    config: EmulatorConfig | None = None,
    more: Iterable[tuple[SlackExport, EmulatorConfig]] = (),
) -> FastAPI:
    """The emulator app; its live state is `app.state.emulator` (an `Emulator`).

    `more` adds workspaces, each with a config whose `tokens` are its own; they are all in
    `app.state.emulators`, the first one first.
    """
    app = FastAPI(title="Slack Web API emulator", docs_url=None, redoc_url=None)
    workspaces = [Emulator(workspace, config or EmulatorConfig())]
    workspaces += [Emulator(export, its_config) for export, its_config in more]
    ids = [w.workspace_id for w in workspaces]
    tokens = [token for w in workspaces for token in w.tokens]
    if len(set(ids)) < len(ids) or len(set(tokens)) < len(tokens):
        raise ValueError(f"workspaces {ids} need distinct ids and tokens of their own")
    app.state.emulator, app.state.emulators = workspaces[0], workspaces
    app.include_router(router)
    return app


def run_emulator(
    export_path: Path | str, host: str = "127.0.0.1", port: int = 8765, **config: Any
) -> None:
    """Serve an export (ZIP or folder, private conversations included) until interrupted.

    `config` takes EmulatorConfig's fields, e.g. `rate_limit_per_minute=20, fail_rate=0.1,
    bot_user="U123"`. Clients use `WebClient(token="xoxb-emulator",
    base_url=f"http://{host}:{port}/api/")`.
    """
    max_bytes = ExportSettings().max_unzipped_mb * 2**20
    workspace = read_export(Path(export_path), include_private=True, max_bytes=max_bytes)
    config.setdefault("team_name", Path(export_path).stem)  # as `doppel ingest export` names it
    uvicorn.run(create_app(workspace, EmulatorConfig(**config)), host=host, port=port)


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve `app` on a free port in a background thread; yields the API base URL.

    The URL ends in `/api/`, ready for `WebClient(base_url=...)`; the helper endpoints are
    at `urljoin(url, "/emulator/...")`. The server is shut down when the block exits.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="slack-emulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the Slack emulator did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}/api/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
