"""`app_mention`: answer in the thread, in the voice of the persona active there.

The event is acknowledged at once, before anything is written. A lazy listener, on the
mentions' own bounded pool (`serving/slack/pools.py`), then records the event id (a Slack
retry stops there), checks the author's and the channel's limits
(`serving/slack/ratelimit.py`), posts a placeholder, reads the thread (or the channel's
recent history), renders it with the training code, asks the model API and replaces the
placeholder with the reply, made safe for Slack first (`serving/slack/escape.py`). Replies
carry the persona's name and avatar, and always say that DoppelBot wrote them.
"""

from __future__ import annotations

import logging
import secrets
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict

from slack_bolt import App, BoltContext
from slack_sdk import WebClient
from slack_sdk.errors import SlackClientError

from doppel.dataset.clean import TextCleaner
from doppel.dataset.live import thread_prompt
from doppel.dataset.samples import SampleRules
from doppel.errors import DoppelError
from doppel.redact import redact
from doppel.store.lookup import channel_names
from serving.slack.escape import escape, slack_safe
from serving.slack.model_client import NoProductionAdapter
from serving.slack.people import Directory
from serving.slack.pools import PooledLazyRunner, WorkerPool
from serving.slack.services import Services
from serving.slack.state import active_persona, first_delivery

log = logging.getLogger(__name__)
MAX_THREAD_PAGES = 5  # 1,000 messages; the prompt keeps the newest few anyway


class Plain(TypedDict):
    """How every message is posted: Slack makes no links and no mentions of its own."""

    parse: str
    link_names: bool


class Author(TypedDict):
    """Who a reply shows as: the persona's name, marked as DoppelBot, and avatar."""

    username: str
    icon_url: str | None


PLAIN: Plain = {"parse": "none", "link_names": False}  # Slack links and notifies nothing itself

NO_PERSONA = (
    "Nobody answers mentions here yet. Someone who opted in (`/doppel optin`) can be "
    "picked with `/doppel switch @user`; `/doppel list` shows who opted in."
)
BUSY = "I am answering too many mentions right now. Mention me again in a minute."


@dataclass(frozen=True)
class Mention:
    """One @mention of the bot, and where its answer goes."""

    workspace_id: str
    user_id: str
    channel: str
    ts: str
    thread_ts: str | None  # None: the mention is not in a thread

    @classmethod
    def of(cls, event: dict, workspace_id: str) -> Mention:
        return cls(
            workspace_id,
            event.get("user") or "",
            event["channel"],
            event["ts"],
            event.get("thread_ts"),
        )

    @property
    def root(self) -> str:
        """The thread the answer goes to: the mention's own, or a new one under it."""
        return self.thread_ts or self.ts


def register_mentions(
    app: App, services: Services, runner: PooledLazyRunner, pool: WorkerPool
) -> None:
    """Wire `app_mention` into the Bolt app, its answers on `pool`."""

    def acknowledge(ack: Callable[..., Any]) -> None:
        ack()

    def answer(body: dict, event: dict, context: BoltContext, client: WebClient) -> None:
        mention = Mention.of(event, context.team_id or "")
        if not first_delivery(services.db, body["event_id"], mention.workspace_id):
            log.info("event %s again: already handled", body["event_id"])
            return
        refusal = services.limiter.admit(mention.workspace_id, mention.user_id, mention.channel)
        if refusal is not None:
            tell(client, mention, refusal)
            return
        answer_mention(services, mention, context.bot_user_id, client)

    def busy(event: dict, context: BoltContext, client: WebClient) -> None:
        tell(client, Mention.of(event, context.team_id or ""), BUSY)

    app.event("app_mention")(ack=acknowledge, lazy=[answer])
    runner.route(answer, pool, busy)


def tell(client: WebClient, mention: Mention, text: str) -> None:
    """A note only the mention's author sees, in its thread."""
    client.chat_postEphemeral(
        channel=mention.channel, user=mention.user_id, thread_ts=mention.root, text=text, **PLAIN
    )


def answer_mention(
    services: Services, mention: Mention, bot_user_id: str | None, client: WebClient
) -> None:
    with services.db.session() as session:
        persona = active_persona(session, mention.workspace_id, mention.channel)
        directory = Directory(session, mention.workspace_id, client)
    if persona is None:
        client.chat_postMessage(
            channel=mention.channel, thread_ts=mention.root, text=NO_PERSONA, **PLAIN
        )
        return
    name = directory.label(persona)
    author: Author = {"username": f"{name} (DoppelBot)", "icon_url": directory.avatar(persona)}
    placeholder = client.chat_postMessage(
        channel=mention.channel,
        thread_ts=mention.root,
        text=f"_{escape(name)} is typing…_",
        **author,
        **PLAIN,
    )
    try:
        text = compose(services, mention, persona, name, directory, bot_user_id, client)
    except Exception as error:  # never leave the placeholder typing forever
        text = apology(error, mention)
    deliver(client, mention, placeholder["ts"], text, name, author)


def compose(
    services: Services,
    mention: Mention,
    persona: str,
    name: str,
    directory: Directory,
    bot_user_id: str | None,
    client: WebClient,
) -> str:
    """The text that replaces the placeholder, ready to post: the persona's reply, or why
    there is none."""
    settings = services.settings
    with services.db.session() as session:
        channels = channel_names(session, mention.workspace_id)
    messages = (
        thread_messages(client, mention.channel, mention.thread_ts, mention.ts)
        if mention.thread_ts
        else channel_messages(
            client, mention.channel, mention.ts, settings.slack_app.history_messages
        )
    )
    # "@DoppelBot, what do you think?" is asked of the persona.
    names = directory.names(messages, {bot_user_id: name} if bot_user_id else {})
    try:
        chat = thread_prompt(
            mention.channel,
            messages,
            persona,
            names,
            channels,
            bots=directory.bots(),
            rules=SampleRules.from_settings(settings.dataset),
            gap_minutes=settings.dataset.gap_minutes,
        )
    except DoppelError as error:  # nothing here to answer: the asker can change that
        return escape(f"Sorry, I could not answer as {name}: {error.message}.")
    try:
        reply = services.model.reply(mention.workspace_id, persona, chat)
    except NoProductionAdapter:
        return escape(
            f"{name} has no trained voice yet: nothing has been promoted to production. "
            f"{name} (or an admin) can start a training with `/doppel train`."
        )
    cleaner = TextCleaner(directory.names([{"text": reply}], names), channels)
    return slack_safe(reply, cleaner, settings.slack_app.max_reply_chars)


def apology(error: Exception, mention: Mention) -> str:
    """What the asker sees when answering failed: an apology and a reference. The details,
    credentials redacted, go to the log under that reference."""
    ref = secrets.token_hex(4)
    details = (
        str(error) if isinstance(error, DoppelError) else "".join(traceback.format_exception(error))
    )
    log.error(
        "no reply in %s/%s (ref %s): %s",
        mention.workspace_id,
        mention.channel,
        ref,
        redact(details),
    )
    return f"Sorry, something went wrong; an admin can find details in the logs (ref {ref})."


def deliver(
    client: WebClient, mention: Mention, placeholder: str, text: str, name: str, author: Author
) -> None:
    """Replace the placeholder with `text`. When Slack refuses that, post `text` as plain
    text in the thread instead and delete the placeholder, so it never stays "typing…"."""
    try:
        client.chat_update(
            channel=mention.channel, ts=placeholder, text=text, blocks=_marked(text, name), **PLAIN
        )
        return
    except (SlackClientError, OSError) as error:
        log.warning("could not replace the placeholder in %s: %s", mention.channel, error)
    try:
        client.chat_postMessage(
            channel=mention.channel,
            thread_ts=mention.root,
            text=f"{text}\n\n{_signature(name)}",
            unfurl_links=False,
            unfurl_media=False,
            **author,
            **PLAIN,
        )
    finally:
        try:
            client.chat_delete(channel=mention.channel, ts=placeholder)
        except (SlackClientError, OSError) as error:
            log.warning("could not delete the placeholder in %s: %s", mention.channel, error)


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


def _signature(name: str) -> str:
    name = escape(name)
    return f":robot_face: Written by DoppelBot in {name}'s style, not by {name}."


def _marked(text: str, name: str) -> list[dict]:
    """The reply as verbatim mrkdwn (Slack links and parses nothing in it), and a line
    under it that says a bot wrote it."""
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text, "verbatim": True}},
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": _signature(name), "verbatim": True}],
        },
    ]
