"""The DoppelBot Slack app: Bolt for Python, mounted in FastAPI.

Routes: `POST /slack/events` (events, slash commands and interactivity),
`GET /slack/install` and `GET /slack/oauth_redirect` (OAuth installs).

Two ways to hold credentials:
- one workspace: `SLACK_BOT_TOKEN` and `SLACK_SIGNING_SECRET`;
- many workspaces: `SLACK_CLIENT_ID`, `SLACK_CLIENT_SECRET`, `SLACK_SIGNING_SECRET` and
  `DOPPEL_SECRET_KEY`. Installs go through Bolt's OAuth flow into the database, tokens
  encrypted.
Every Slack call goes to `SLACK_API_URL` (the emulator in tests). Bolt checks every
request's signature (HMAC v0, timestamps within 5 minutes) before anything else runs: a
bad or stale one gets 401, and nothing is processed or stored. A request is acknowledged
before anything is written; the work then runs on bounded pools, mentions apart from
commands (`serving/slack/pools.py`). Alone (`doppel slack-app`), the app refuses bodies
over `slack_app.max_request_bytes` (`serving/body_limit.py`, shared with the model API).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from slack_bolt import App, BoltContext, BoltResponse, Respond
from slack_bolt.adapter.starlette.handler import to_bolt_request, to_starlette_response
from slack_bolt.error import BoltError
from slack_bolt.oauth import OAuthFlow
from slack_bolt.oauth.oauth_settings import OAuthSettings
from slack_sdk import WebClient
from starlette.concurrency import run_in_threadpool

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.redact import redact_url
from doppel.store.database import Database, database
from serving.body_limit import BodyLimit
from serving.slack.commands import register_commands
from serving.slack.installations import oauth_stores
from serving.slack.mentions import register_mentions
from serving.slack.model_client import ChatModel, ModelClient
from serving.slack.pools import PooledLazyRunner, WorkerPool
from serving.slack.ratelimit import MentionLimiter
from serving.slack.revocations import register_revocations
from serving.slack.services import Services
from serving.slack.training import Trainer

log = logging.getLogger(__name__)

CREDENTIALS_HINT = (
    "set SLACK_SIGNING_SECRET and either SLACK_BOT_TOKEN (one workspace) or SLACK_CLIENT_ID, "
    "SLACK_CLIENT_SECRET and DOPPEL_SECRET_KEY (OAuth, many workspaces); see README, Slack app"
)


class SlackApp:
    """The Bolt app, its FastAPI routes and what its handlers share. `close()` it."""

    def __init__(self, settings: Settings, model: ChatModel) -> None:
        if not settings.slack_signing_secret:
            raise DoppelError("SLACK_SIGNING_SECRET is not set", CREDENTIALS_HINT)
        limits = settings.slack_app
        self.db = database(settings.db_url)
        self.bolt = build_bolt(settings, self.db)
        self.trainer = Trainer(settings, self.db)
        limiter = MentionLimiter(
            limits.mentions_per_user_per_minute, limits.mentions_per_channel_per_minute
        )
        self.services = Services(settings, self.db, model, self.trainer, limiter)
        self.mentions = WorkerPool("mentions", limits.mention_workers, limits.max_waiting)
        self.commands = WorkerPool("commands", limits.command_workers, limits.max_waiting)
        runner = PooledLazyRunner(self.bolt, default=self.commands, busy=command_busy)
        self.bolt.use(same_workspace)
        register_mentions(self.bolt, self.services, runner, self.mentions)
        register_commands(self.bolt, self.services)
        register_revocations(self.bolt)
        self.router = slack_routes(self.bolt)

    def close(self) -> None:
        for pool in (self.mentions, self.commands):  # waiting work is dropped, running ends
            pool.shutdown(wait=False, cancel_futures=True)
        self.trainer.close()


def build_bolt(settings: Settings, db: Database) -> App:
    """A Bolt app for one workspace (bot token) or many (OAuth), acking before it works.

    Both kinds ack first (`process_before_response=False`); lazy listeners do the work.
    """
    secret = settings.slack_signing_secret
    if settings.slack_client_id and settings.slack_client_secret:
        installations, states = oauth_stores(
            db.engine, settings.slack_client_id, settings.secret_key
        )
        oauth = OAuthSettings(
            client_id=settings.slack_client_id,
            client_secret=settings.slack_client_secret,
            scopes=settings.slack_app.scopes,
            user_scopes=[],
            redirect_uri=settings.slack_app.redirect_uri,
            authorization_url=settings.slack_app.authorization_url,
            install_page_rendering_enabled=False,  # /slack/install goes straight to Slack
            installation_store=installations,
            state_store=states,
        )
        # The client carries no token: each request gets its workspace's installed one.
        client = WebClient(base_url=settings.slack_api_url)
        return App(
            client=client,
            oauth_settings=oauth,
            signing_secret=secret,
            process_before_response=False,
        )
    if settings.slack_bot_token:
        client = WebClient(token=settings.slack_bot_token, base_url=settings.slack_api_url)
        try:
            return App(client=client, signing_secret=secret, process_before_response=False)
        except BoltError as error:
            raise DoppelError(
                f"Slack refused SLACK_BOT_TOKEN at {settings.slack_api_url}: {error}",
                "check the token, and SLACK_API_URL if you set it",
            ) from None
    raise DoppelError("the Slack app has no credentials", CREDENTIALS_HINT)


def same_workspace(context: BoltContext, next: Callable[[], None]) -> BoltResponse | None:
    """Serve a request only with its own workspace's token: a request that names one
    workspace while the token speaks for another is dropped."""
    authorized = context.authorize_result
    if authorized and authorized.team_id and context.team_id != authorized.team_id:
        log.warning(
            "dropped a request of %s: the token is %s's", context.team_id, authorized.team_id
        )
        return BoltResponse(status=200, body="")
    next()
    return None


def command_busy(respond: Respond) -> None:
    """What `/doppel` answers while every command worker is busy and the backlog is full."""
    respond("DoppelBot is busy right now; run the command again in a minute.")


def slack_routes(bolt: App) -> APIRouter:
    """FastAPI routes that hand requests to Bolt in a worker thread, so that Bolt's
    blocking calls never stall the event loop (the model API may share it)."""
    router = APIRouter(prefix="/slack", tags=["slack"])

    @router.post("/events")
    async def events(request: Request) -> Response:
        bolt_request = to_bolt_request(request, await request.body())
        return to_starlette_response(await run_in_threadpool(bolt.dispatch, bolt_request))

    @router.get("/install")
    async def install(request: Request) -> Response:
        flow = _oauth_flow(bolt)
        bolt_request = to_bolt_request(request, await request.body())
        return to_starlette_response(
            await run_in_threadpool(flow.handle_installation, bolt_request)
        )

    @router.get("/oauth_redirect")
    async def oauth_redirect(request: Request) -> Response:
        flow = _oauth_flow(bolt)
        bolt_request = to_bolt_request(request, await request.body())
        return to_starlette_response(await run_in_threadpool(flow.handle_callback, bolt_request))

    return router


def _oauth_flow(bolt: App) -> OAuthFlow:
    """The OAuth flow; a single-workspace app has none, and says how to get one."""
    if bolt.oauth_flow is None:
        raise HTTPException(
            404, "this DoppelBot serves one workspace (SLACK_BOT_TOKEN); " + CREDENTIALS_HINT
        )
    return bolt.oauth_flow


def mount_slack(app: FastAPI, settings: Settings, model: ChatModel) -> SlackApp:
    """Add the Slack routes to an existing FastAPI app (the model server's, in
    `doppel serve`). Close the returned SlackApp when that app shuts down."""
    slack = SlackApp(settings, model)
    app.include_router(slack.router)
    return slack


def standalone_app(settings: Settings, serving_url: str | None = None) -> FastAPI:
    """The Slack app alone (`doppel slack-app`), calling the model API over HTTP."""
    model = ModelClient.from_settings(settings, serving_url or settings.serving_url)
    slack = SlackApp(settings, model)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        slack.close()
        model.close()

    app = FastAPI(title="DoppelBot Slack app", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.slack_app.max_request_bytes)
    app.include_router(slack.router)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "model_api": ", ".join(map(redact_url, model.base_urls))}

    return app
