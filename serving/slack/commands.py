"""`/doppel`: consent, training and personas, from Slack.

Slack wants an answer within 3 seconds, so the command is acknowledged at once and the
work runs in a lazy listener, which answers through `respond` (only the person who typed
the command sees it). Every subcommand reads and writes the requester's workspace only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from slack_bolt import App, BoltContext, Respond
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from doppel.consent import consented_users, grant, has_consent, revoke
from doppel.errors import DoppelError
from doppel.store.lookup import people, resolve_user
from doppel.store.models import utcnow
from serving.slack.people import Directory, is_admin
from serving.slack.services import Services
from serving.slack.state import (
    WORKSPACE_WIDE,
    active_persona,
    limits,
    persona_scopes,
    recent_trainings,
    set_persona,
    trainings_since,
)
from serving.slack.training import Notify

log = logging.getLogger(__name__)
USER_REF = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$")  # how Slack escapes "@someone"

HELP = """*DoppelBot* learns how people here write and answers in their voice when @mentioned.
• `/doppel optin`: let DoppelBot learn from your messages and answer as you
• `/doppel optout`: withdraw that, cancel your trainings, and delete your datasets, \
adapters and model versions
• `/doppel train [@user]`: train your persona (admins: anyone who opted in)
• `/doppel list`: who opted in, and who answers mentions here
• `/doppel switch @user [workspace]`: who answers mentions in this channel \
(admins: in the whole workspace)
• `/doppel status`: the latest trainings and the models in production
• `/doppel help`: this message"""


@dataclass
class Command:
    """One `/doppel` request, with what its subcommand needs."""

    services: Services
    client: WebClient
    workspace_id: str
    user_id: str
    channel_id: str
    args: list[str]

    def person(self, word: str) -> str:
        """A user id from "@someone" (as Slack escapes it) or a name known in this workspace."""
        match = USER_REF.match(word)
        if match:
            return match.group(1)
        with self.services.db.session() as session:
            known = people(session, self.workspace_id)
        try:
            return resolve_user(known, word).id
        except DoppelError as error:
            if error.hint and error.hint.startswith("did you mean"):
                raise
            raise DoppelError(error.message, "@mention them instead of typing a name") from None

    def label(self, user_id: str) -> str:
        with self.services.db.session() as session:
            return Directory(session, self.workspace_id, self.client).label(user_id)

    def is_admin(self) -> bool:
        return is_admin(self.client, self.user_id, self.services.settings.slack_app.admins)

    def require_consent(self, user_id: str) -> None:
        with self.services.db.session() as session:
            if not has_consent(session, self.workspace_id, user_id):
                raise DoppelError(
                    f"{self.label(user_id)} has not opted in",
                    "only people who ran `/doppel optin` can be trained or answer as themselves",
                )


def register_commands(app: App, services: Services) -> None:
    """Wire `/doppel` into the Bolt app."""

    def acknowledge(ack: Callable[..., Any]) -> None:
        ack()

    def run(command: dict, context: BoltContext, client: WebClient, respond: Respond) -> None:
        words = (command.get("text") or "").split()
        name = words[0].lower() if words else "help"
        request = Command(
            services,
            client,
            context.team_id or "",
            command["user_id"],
            command["channel_id"],
            words[1:],
        )
        handler = SUBCOMMANDS.get(name)
        try:
            text = handler(request) if handler else f"Unknown subcommand `{name}`.\n{HELP}"
        except DoppelError as error:
            text = f":warning: {error.message}" + (f"\n_{error.hint}_" if error.hint else "")
        except Exception:
            log.exception("/doppel %s failed in %s", name, request.workspace_id)
            text = f":warning: `/doppel {name}` failed unexpectedly; the app's log says why."
        respond(text)

    app.command("/doppel")(ack=acknowledge, lazy=[run])


# -- subcommands ----------------------------------------------------------------------------


def optin(request: Command) -> str:
    services = request.services
    with services.db.transaction() as session:
        cap = limits(session, request.workspace_id, services.settings.slack_app).max_enrolled
        new = grant(session, request.workspace_id, request.user_id, request.user_id, cap)
    if not new:
        return "You had already opted in. `/doppel optout` withdraws it."
    return (
        "You opted in: DoppelBot may learn from your messages in this workspace and answer "
        "as you where your persona is switched on. `/doppel train` trains it; "
        "`/doppel optout` withdraws consent and deletes what was made."
    )


def optout(request: Command) -> str:
    """Withdraw consent at once, cancel the person's trainings, delete what was made."""
    services, workspace_id, user_id = request.services, request.workspace_id, request.user_id
    deletion = revoke(
        services.settings,
        services.db,
        workspace_id,
        user_id,
        user_id,
        stop_trainings=lambda failed: services.trainer.cancel(workspace_id, user_id, failed),
    )
    answer = (
        "You opted out: DoppelBot will not train on you or answer as you. Deleted:\n"
        + "\n".join(f"• {line}" for line in deletion.lines())
    )
    if not deletion.complete:
        answer += "\n_Some of it could not be deleted yet: `/doppel optout` again finishes it._"
    return answer


def train(request: Command) -> str:
    services = request.services
    target = request.person(request.args[0]) if request.args else request.user_id
    if target != request.user_id and not request.is_admin():
        raise DoppelError(
            "only workspace admins can train someone else",
            "ask them to run `/doppel train` themselves",
        )
    request.require_consent(target)
    with services.db.session() as session:
        cap = limits(session, request.workspace_id, services.settings.slack_app).trainings_per_day
        recent = trainings_since(session, request.workspace_id, utcnow() - timedelta(days=1))
    if recent >= cap:
        raise DoppelError(
            f"this workspace has used its {cap} trainings of the last 24 hours",
            "try again later, or ask the operator to raise it: doppel limits --trainings-per-day N",
        )
    label = request.label(target)
    request_id = services.trainer.submit(
        request.workspace_id, target, label, request.user_id, direct_messages(request)
    )
    return (
        f"Training of {label} is queued (request {request_id}). "
        "I will send progress as direct messages."
    )


def list_personas(request: Command) -> str:
    with request.services.db.session() as session:
        enrolled = consented_users(session, request.workspace_id)
        scopes = persona_scopes(session, request.workspace_id)
        here = active_persona(session, request.workspace_id, request.channel_id)
        directory = Directory(session, request.workspace_id, request.client)
        if not enrolled:
            return "Nobody here has opted in yet: `/doppel optin`."
        lines = []
        for user_id in enrolled:
            notes = []
            if scopes.get(request.channel_id) == user_id:
                notes.append("answers in this channel")
            if scopes.get(WORKSPACE_WIDE) == user_id:
                notes.append("workspace default")
            if here == user_id and not notes:
                notes.append("answers here: the only one enrolled")
            suffix = f" ({', '.join(notes)})" if notes else ""
            lines.append(f"• {directory.label(user_id)} <@{user_id}>{suffix}")
    return "*People who opted in*\n" + "\n".join(lines)


def switch(request: Command) -> str:
    if not request.args:
        raise DoppelError("whom should I switch to?", "`/doppel switch @user [workspace]`")
    target = request.person(request.args[0])
    workspace_wide = "workspace" in (word.lower() for word in request.args[1:])
    if workspace_wide and not request.is_admin():
        raise DoppelError(
            "only workspace admins can set the workspace's default persona",
            "switch this channel instead: `/doppel switch @user`",
        )
    request.require_consent(target)
    scope = WORKSPACE_WIDE if workspace_wide else request.channel_id
    with request.services.db.transaction() as session:
        set_persona(session, request.workspace_id, scope, target, request.user_id)
    where = (
        "everywhere in this workspace without a channel persona"
        if workspace_wide
        else ("in this channel")
    )
    return f"{request.label(target)} now answers mentions {where}."


def status(request: Command) -> str:
    from doppel.registry import Registry  # MLflow is slow to import

    services = request.services
    with services.db.session() as session:
        runs = recent_trainings(session, request.workspace_id)
        directory = Directory(session, request.workspace_id, request.client)
        lines = ["*Latest trainings*"]
        lines += [
            f"• {run.requested_at:%Y-%m-%d %H:%M} UTC {directory.label(run.user_id)}: "
            f"{run.status}" + (f", {run.detail}" if run.detail else "")
            for run in runs
        ] or ["• none yet: `/doppel train`"]
        lines.append("*In production*")
        models = Registry(services.settings).models(request.workspace_id)
        serving = [model for model in models if model["production"] is not None]
        for model in serving:
            version = next(v for v in model["versions"] if v["version"] == model["production"])
            lines.append(
                f"• {directory.label(model['user_id'])}: version {version['version']}"
                + _metrics(version["metrics"])
            )
    if not serving:
        lines.append("• nobody yet")
    return "\n".join(lines)


def show_help(request: Command) -> str:
    return HELP


SUBCOMMANDS: dict[str, Callable[[Command], str]] = {
    "optin": optin,
    "optout": optout,
    "train": train,
    "list": list_personas,
    "switch": switch,
    "status": status,
    "help": show_help,
}


def direct_messages(request: Command) -> Notify:
    """Progress for the requester, in their DM with the app (it outlives `response_url`)."""

    def notify(text: str) -> None:
        try:
            request.client.chat_postMessage(channel=request.user_id, text=text)
        except SlackApiError as error:
            log.warning("could not message %s: %s", request.user_id, error)

    return notify


def _metrics(metrics: dict[str, float]) -> str:
    if not {"eval_loss", "base_eval_loss"} <= set(metrics):
        return ""
    loss, base = metrics["eval_loss"], metrics["base_eval_loss"]
    return f", validation loss {loss:.3f} ({1 - loss / base:.0%} below the base model's {base:.3f})"
