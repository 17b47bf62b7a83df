"""Stored messages to conversations of turns.

A conversation is a thread (its parent and replies in ts order) or, outside threads,
a run of channel messages in which no gap reaches `gap_minutes`. Consecutive
messages by one author merge into one turn. Only people talking survive: bot posts,
joins, topic changes and the like are dropped and counted.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from operator import attrgetter
from typing import NamedTuple

from doppel.dataset.clean import SPOKEN_SUBTYPES


class StoredMessage(NamedTuple):
    """The columns of a stored message that conversations need (a SQLAlchemy Row fits)."""

    channel_id: str
    ts: str
    thread_ts: str | None
    user_id: str | None
    subtype: str | None
    bot_id: str | None
    text: str


@dataclass(slots=True)
class Turn:
    author: str
    text: str
    ts: str  # the turn's first message


@dataclass(slots=True)
class Conversation:
    id: str  # "<channel>:<first ts>", stable across re-ingests
    channel_id: str
    turns: list[Turn]


@dataclass
class Segmentation:
    conversations: list[Conversation]
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> messages


def drop_reason(message: StoredMessage, bots: set[str]) -> str | None:
    """Why a message is not a person talking, or None when it is."""
    if message.subtype not in SPOKEN_SUBTYPES:
        return f"subtype:{message.subtype}"
    if message.bot_id or message.user_id in bots:
        return "bot"
    if not message.user_id:
        return "no_user"
    return None


def segment(
    messages: Iterable[StoredMessage],
    *,
    bots: set[str],
    clean: Callable[[str], str],
    gap_minutes: float,
) -> Segmentation:
    """Split messages, sorted by (channel_id, ts), into conversations.

    The cyclic garbage collector is paused meanwhile: the objects built here have no
    cycles, and GC passes over a million fresh objects more than halved throughput.
    """
    with gc_paused():
        return _segment(messages, bots, clean, gap_minutes)


@contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _segment(
    messages: Iterable[StoredMessage],
    bots: set[str],
    clean: Callable[[str], str],
    gap_minutes: float,
) -> Segmentation:
    result = Segmentation(conversations=[])
    gap = gap_minutes * 60.0
    for channel_id, group in groupby(messages, key=attrgetter("channel_id")):
        rows = list(group)
        # A message is in a thread when its thread has replies (decided before filtering,
        # so a person's reply to a bot's post still lands in that thread).
        threaded = {row.thread_ts for row in rows if row.thread_ts and row.thread_ts != row.ts}
        threads: dict[str, list[tuple[str, str, str]]] = {}
        stream: list[tuple[str, str, str]] = []
        for row in rows:
            reason = drop_reason(row, bots)
            if reason is None:
                text = clean(row.text)
                reason = None if text else "empty"
            if reason is not None:
                result.dropped[reason] += 1
                continue
            user_id = row.user_id
            assert user_id, "drop_reason() drops messages without a user"
            item = (row.ts, user_id, text)
            if row.thread_ts in threaded:
                threads.setdefault(row.thread_ts, []).append(item)
            else:
                stream.append(item)
        result.conversations.extend(_channel_runs(channel_id, stream, gap))
        result.conversations.extend(_conversation(channel_id, items) for items in threads.values())
    return result


def _channel_runs(
    channel_id: str, stream: list[tuple[str, str, str]], gap: float
) -> Iterable[Conversation]:
    run: list[tuple[str, str, str]] = []
    last = 0.0
    for item in stream:
        now = float(item[0])
        if run and now - last >= gap:
            yield _conversation(channel_id, run)
            run = []
        run.append(item)
        last = now
    if run:
        yield _conversation(channel_id, run)


def _conversation(channel_id: str, items: list[tuple[str, str, str]]) -> Conversation:
    turns: list[Turn] = []
    for ts, author, text in items:
        if turns and turns[-1].author == author:
            turns[-1].text += "\n" + text
        else:
            turns.append(Turn(author, text, ts))
    return Conversation(f"{channel_id}:{items[0][0]}", channel_id, turns)
