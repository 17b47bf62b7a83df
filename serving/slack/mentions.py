"""`app_mention`: answer in the thread, in the voice of the persona active there.

The event is acknowledged at once; a lazy listener then posts a placeholder, reads the
thread (or the channel's recent history), renders it with the training code, asks the
model API and replaces the placeholder with the reply. Replies carry the persona's name
and avatar, and always say that DoppelBot wrote them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from slack_bolt import App, BoltContext
from slack_sdk import WebClient

from doppel.dataset.live import thread_prompt
from doppel.dataset.samples import SampleRules
from doppel.errors import DoppelError
from doppel.store.lookup import channel_names
from serving.slack.model_client import NoProductionAdapter
from serving.slack.people import Directory
from serving.slack.services import Services
from serving.slack.state import active_persona

log = logging.getLogger(__name__)
MAX_THREAD_PAGES = 5  # 1,000 messages; the prompt keeps the newest few anyway

NO_PERSONA = (
    "Nobody answers mentions here yet. Someone who opted in (`/doppel optin`) can be "
    "picked with `/doppel switch @user`; `/doppel list` shows who opted in."
)


def register_mentions(app: App, services: Services) -> None:
    """Wire `app_mention` into the Bolt app."""

    def acknowledge(ack: Callable[..., Any]) -> None:
        ack()

    def answer(event: dict, context: BoltContext, client: WebClient) -> None:
        answer_mention(services, event, context.team_id or "", context.bot_user_id, client)

    app.event("app_mention")(ack=acknowledge, lazy=[answer])


def answer_mention(
    services: Services, event: dict, workspace_id: str, bot_user_id: str | None, client: WebClient
) -> None:
    channel, mention_ts = event["channel"], event["ts"]
    thread_ts = event.get("thread_ts")
    root = thread_ts or mention_ts
    with services.db.session() as session:
        persona = active_persona(session, workspace_id, channel)
        channels = channel_names(session, workspace_id)
        directory = Directory(session, workspace_id, client)
    if persona is None:
        client.chat_postMessage(channel=channel, thread_ts=root, text=NO_PERSONA)
        return
    name = directory.label(persona)
    placeholder = client.chat_postMessage(
        channel=channel,
        thread_ts=root,
        text=f"_{name} is typing…_",
        username=f"{name} (DoppelBot)",
        icon_url=directory.avatar(persona),
    )
    try:
        messages = (
            thread_messages(client, channel, thread_ts, mention_ts)
            if thread_ts
            else channel_messages(
                client, channel, mention_ts, services.settings.slack_app.history_messages
            )
        )
        # "@DoppelBot, what do you think?" is asked of the persona.
        names = directory.names(messages, {bot_user_id: name} if bot_user_id else {})
        chat = thread_prompt(
            channel,
            messages,
            persona,
            names,
            channels,
            bots=directory.bots(),
            rules=SampleRules.from_settings(services.settings.dataset),
            gap_minutes=services.settings.dataset.gap_minutes,
        )
        text = services.model.reply(workspace_id, persona, chat)
    except NoProductionAdapter:
        text = (
            f"{name} has no trained voice yet: nothing has been promoted to production. "
            f"{name} (or an admin) can start a training with `/doppel train`."
        )
    except DoppelError as error:
        log.warning("no reply in %s/%s: %s", workspace_id, channel, error)
        text = f"Sorry, I could not answer as {name}: {error.message}."
    except Exception:  # never leave the placeholder typing forever
        log.exception("no reply in %s/%s", workspace_id, channel)
        text = f"Sorry, I could not answer as {name}: something failed unexpectedly."
    client.chat_update(channel=channel, ts=placeholder["ts"], text=text, blocks=_marked(text, name))


def thread_messages(client: WebClient, channel: str, thread_ts: str, until: str) -> list[dict]:
    """The thread up to the mention, parent first (`conversations.replies`, every page)."""
    messages: list[dict] = []
    cursor = None
    for _ in range(MAX_THREAD_PAGES):
        page = client.conversations_replies(
            channel=channel, ts=thread_ts, latest=until, inclusive=True, limit=200, cursor=cursor
        )
        messages += page["messages"]
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            break
    return messages


def channel_messages(client: WebClient, channel: str, until: str, limit: int) -> list[dict]:
    """The channel's latest messages up to the mention. Threads are conversations of their
    own in training, so their parents and broadcast replies are left out here too (the
    mention itself stays, though the placeholder has just made it a thread parent)."""
    page = client.conversations_history(channel=channel, latest=until, inclusive=True, limit=limit)
    return [
        m
        for m in page["messages"]
        if m["ts"] == until or (m.get("thread_ts") in (None, m["ts"]) and not m.get("reply_count"))
    ]


def _marked(text: str, name: str) -> list[dict]:
    """The reply, and a line under it that says a bot wrote it."""
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": f":robot_face: Written by DoppelBot in {name}'s style, not by {name}.",
                }
            ],
        },
    ]
