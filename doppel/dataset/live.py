"""A live Slack conversation to the chat a persona's model answers.

This is the training path, unchanged: the same cleaning (`TextCleaner`), the same
filtering and turn merging (`segment`), the same scrubbing of secrets and personal data
(`Scrubber`), the same trimming (`trim_context`) and the same rendering (`render_chat`).
So a thread seen live is exactly what a training sample's context would have been. The
scrubbing matters twice here: a key pasted in the thread never reaches the model API, so
the persona cannot repeat it in its reply, and the model sees `[AWS_KEY]` where it learned
to. The system message is left out: the model API adds the persona's own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from doppel.dataset.clean import TextCleaner
from doppel.dataset.conversations import StoredMessage, Turn, segment
from doppel.dataset.samples import SampleRules, render_chat, trim_context
from doppel.dataset.scrub import Scrubber
from doppel.errors import DoppelError
from doppel.types import ChatMessage


def stored(channel_id: str, message: Mapping[str, Any]) -> StoredMessage:
    """A Slack API message as the store would hold it."""
    return StoredMessage(
        channel_id=channel_id,
        ts=message["ts"],
        thread_ts=message.get("thread_ts"),
        user_id=message.get("user"),
        subtype=message.get("subtype"),
        bot_id=message.get("bot_id") or None,
        text=message.get("text") or "",
    )


def thread_prompt(
    channel_id: str,
    messages: Iterable[Mapping[str, Any]],
    persona: str,
    names: Mapping[str, str],
    channels: Mapping[str, str],
    *,
    bots: set[str],
    rules: SampleRules,
    gap_minutes: float,
) -> list[ChatMessage]:
    """The chat for `persona`'s next message after `messages` (a thread, or recent
    channel history), without the system message.

    Only the latest conversation counts: in channel history, talk before a quiet gap of
    `gap_minutes` is another conversation, exactly as in training.
    """
    rows = sorted((stored(channel_id, m) for m in messages), key=lambda row: Decimal(row.ts))
    clean = TextCleaner(names, channels)
    conversations = segment(rows, bots=bots, clean=clean, gap_minutes=gap_minutes).conversations
    if not conversations:
        raise DoppelError("there is nothing to reply to here", "mention the bot under a message")
    latest = max(conversations, key=lambda c: Decimal(c.turns[-1].ts))
    scrub = Scrubber.for_rules(rules)
    turns = [Turn(t.author, scrub(t.text), t.ts) for t in latest.turns[-rules.max_context_turns :]]
    chat = render_chat("", trim_context(turns, rules), persona, names)[1:]
    if not chat or chat[-1]["role"] != "user":
        raise DoppelError(
            "there is nothing to reply to: the last message here is the persona's own",
            "mention the bot under someone else's message",
        )
    return chat
