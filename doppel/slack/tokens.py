"""Which Slack token reads which workspace.

With OAuth installs every workspace has its own bot token, stored encrypted by the Slack
app (`doppel.slack.installations`). SLACK_USER_TOKEN or SLACK_BOT_TOKEN, when set, is the
token of one workspace more: a single-workspace install. A workspace is read with its
installation's token first, else with the configured token once Slack (auth.test) says it
is that workspace's, so that no workspace is ever read with another's token.

A token's value never reaches a log, a repr, a flow parameter or an error message; only
its `source` is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slack_sdk.errors import SlackApiError
from sqlalchemy import Engine

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.slack.installations import installation_token, installed_workspaces
from doppel.slack.scrape import make_client

INSTALL_HINT = (
    "install the app in that workspace (open /slack/install of the Slack app), or set "
    "SLACK_BOT_TOKEN (xoxb-...) to that workspace's bot token"
)


@dataclass(frozen=True)
class SlackToken:
    """A token and where it came from; only the latter is ever shown."""

    value: str = field(repr=False)
    source: str  # e.g. "SLACK_BOT_TOKEN", "the app's installation in T0123"


def configured_token(settings: Settings) -> SlackToken | None:
    """SLACK_USER_TOKEN (it reads more) or SLACK_BOT_TOKEN, when set."""
    if settings.slack_user_token:
        return SlackToken(settings.slack_user_token, "SLACK_USER_TOKEN")
    if settings.slack_bot_token:
        return SlackToken(settings.slack_bot_token, "SLACK_BOT_TOKEN")
    return None


def installed_token(settings: Settings, engine: Engine, workspace_id: str) -> SlackToken | None:
    """The bot token of the app's installation in the workspace, if it is installed."""
    value = installation_token(
        engine, workspace_id, client_id=settings.slack_client_id, secret_key=settings.secret_key
    )
    return SlackToken(value, f"the app's installation in {workspace_id}") if value else None


def token_workspace(settings: Settings, token: SlackToken) -> str:
    """The workspace a token belongs to, as Slack's auth.test says."""
    try:
        return str(make_client(settings, token.value).auth_test()["team_id"])
    except SlackApiError as error:
        raise DoppelError(
            f"Slack rejected {token.source} ({error.response.get('error', 'unknown_error')})",
            "check the token and SLACK_API_URL",
        ) from None


def find_token(settings: Settings, engine: Engine, workspace_id: str | None) -> SlackToken | None:
    """The token to read `workspace_id` with, or None when we hold none for it.

    Without a workspace: the configured token, else the one installation if there is
    exactly one (today's single-workspace setups keep working unchanged).
    """
    configured = configured_token(settings)
    if workspace_id is None:
        if configured is not None:
            return configured
        installed = installed_workspaces(engine, settings.slack_client_id)
        return installed_token(settings, engine, installed[0]) if len(installed) == 1 else None
    token = installed_token(settings, engine, workspace_id)
    if token is None and configured and token_workspace(settings, configured) == workspace_id:
        token = configured
    return token


def require_token(settings: Settings, engine: Engine, workspace_id: str | None) -> SlackToken:
    """`find_token`, or a DoppelError that says why there is none and how to fix it."""
    token = find_token(settings, engine, workspace_id)
    if token is not None:
        return token
    configured = configured_token(settings)
    if workspace_id is None:
        installed = installed_workspaces(engine, settings.slack_client_id)
        if installed:
            raise DoppelError(
                f"no Slack token is configured and the app is installed in {len(installed)} "
                f"workspaces ({', '.join(installed)})",
                "pass --workspace with one of them",
            )
        raise DoppelError(
            "no Slack token: SLACK_BOT_TOKEN and SLACK_USER_TOKEN are not set and the app is "
            "installed in no workspace",
            "set SLACK_BOT_TOKEN (xoxb-...) or SLACK_USER_TOKEN (xoxp-...), or install the "
            "app through OAuth (/slack/install)",
        )
    other = (
        f", and {configured.source} belongs to workspace {token_workspace(settings, configured)}"
        if configured
        else ", and SLACK_BOT_TOKEN is not set"
    )
    raise DoppelError(
        f"no Slack token for workspace {workspace_id}: the app is not installed there{other}",
        INSTALL_HINT,
    )


def ingestible_workspaces(settings: Settings, engine: Engine) -> list[str]:
    """Every workspace we hold a token for: each installation's, and the configured one's."""
    workspaces = set(installed_workspaces(engine, settings.slack_client_id))
    configured = configured_token(settings)
    if configured is not None:
        workspaces.add(token_workspace(settings, configured))
    return sorted(workspaces)
