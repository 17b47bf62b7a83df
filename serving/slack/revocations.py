"""`tokens_revoked` and `app_uninstalled`: a workspace's tokens are dead, so forget them.

With OAuth, the workspace's stored installs are deleted, and Bolt then refuses its requests
(it finds no installation to authorize them with). Bolt's own revocation listeners delete
only the `slack_bots` row when the bot token is revoked, but every `slack_installations`
row carries that token too, and Bolt would keep authorizing with it: so a revoked bot
token deletes everything of that workspace here. With one workspace (SLACK_BOT_TOKEN)
there is nothing stored to delete; the log says that a new token is needed.
"""

from __future__ import annotations

import logging

from slack_bolt import App, BoltContext

log = logging.getLogger(__name__)


def register_revocations(app: App) -> None:
    """Wire `tokens_revoked` and `app_uninstalled` into the Bolt app."""
    store = app.installation_store

    def forget(event: dict, context: BoltContext) -> None:
        workspace = {"enterprise_id": context.enterprise_id, "team_id": context.team_id}
        tokens = event.get("tokens") or {}
        if store is None:
            log.warning(
                "%s in workspace %s: SLACK_BOT_TOKEN no longer works there; reinstall the "
                "app and set the new token",
                event["type"],
                context.team_id,
            )
        elif event["type"] == "app_uninstalled" or tokens.get("bot"):
            store.delete_all(**workspace)
            log.warning("%s: deleted the installs of workspace %s", event["type"], context.team_id)
        else:  # user tokens only (DoppelBot asks for none): forget those users' installs
            for user_id in tokens.get("oauth") or []:
                store.delete_installation(**workspace, user_id=user_id)

    app.event("tokens_revoked")(forget)
    app.event("app_uninstalled")(forget)
