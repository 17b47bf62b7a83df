"""Conversations to chat samples for one target user, and the train/validation split.

A sample is the system prompt, then the turns *before* the user's reply (oldest
first), then the reply as the final `assistant` message. Nothing posted after the
reply ever enters its context. Other people's turns are `user` messages written
"Name: text"; the target's own earlier turns are `assistant` messages.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from doppel.config import DatasetSettings
from doppel.dataset.conversations import Conversation, Turn, gc_paused
from doppel.types import ChatMessage


@dataclass(frozen=True)
class SampleRules:
    min_chars: int = 100
    max_context_chars: int = 3000
    max_context_turns: int = 12
    scrub_emails: bool = True  # secrets are always scrubbed (`doppel.dataset.scrub`)
    scrub_phones: bool = True
    phone_region: str = "US"

    @classmethod
    def from_settings(cls, settings: DatasetSettings) -> SampleRules:
        """The rules of `dataset:` settings, so training and live replies trim and scrub
        alike."""
        return cls(
            min_chars=settings.min_chars,
            max_context_chars=settings.max_context_chars,
            max_context_turns=settings.max_context_turns,
            scrub_emails=settings.scrub_emails,
            scrub_phones=settings.scrub_phones,
            phone_region=settings.phone_region,
        )


@dataclass
class Sample:
    """A reply and the (trimmed) turns before it; rendered to chat messages on demand."""

    context: list[Turn]
    reply: Turn
    conversation_id: str
    channel_id: str

    def messages(self, system_prompt: str, names: Mapping[str, str]) -> list[ChatMessage]:
        chat = render_chat(system_prompt, self.context, self.reply.author, names)
        chat.append({"role": "assistant", "content": self.reply.text})
        return chat


@dataclass
class UserSamples:
    samples: list[Sample]
    counts: Counter[str] = field(default_factory=Counter)  # turns, and why turns were dropped


def render_chat(
    system_prompt: str, context: list[Turn], target: str, names: Mapping[str, str]
) -> list[ChatMessage]:
    """The chat messages a model sees before it writes `target`'s next turn.

    Roles alternate as chat templates require: adjacent turns by other people merge into
    one `user` message, and the chat opens with a `user` message after the system prompt.
    Serving renders live Slack threads with this same function.
    """
    messages: list[ChatMessage] = [{"role": "system", "content": system_prompt}]
    for turn in context:
        if turn.author == target:
            if len(messages) > 1:  # never open with an assistant turn
                messages.append({"role": "assistant", "content": turn.text})
            continue
        line = f"{names.get(turn.author, turn.author)}: {turn.text}"
        if messages[-1]["role"] == "user":
            messages[-1]["content"] += "\n" + line
        else:
            messages.append({"role": "user", "content": line})
    return messages


def trim_context(turns: list[Turn], rules: SampleRules) -> list[Turn]:
    """Keep the newest turns within the turn and character budgets.

    The turn just before the reply is always kept; if it alone is over budget, its start
    is cut so the words nearest the reply survive.
    """
    kept: list[Turn] = []
    budget = rules.max_context_chars
    for turn in reversed(turns[-rules.max_context_turns :]):
        if len(turn.text) > budget:
            if not kept:
                kept.append(Turn(turn.author, "…" + turn.text[-(budget - 1) :], turn.ts))
            break
        kept.append(turn)
        budget -= len(turn.text)
    kept.reverse()
    return kept


def user_samples(
    conversations: Iterable[Conversation], target: str, rules: SampleRules
) -> UserSamples:
    """Every long-enough turn of `target` that answers someone else becomes a sample."""
    with gc_paused():  # many small acyclic objects: see `segment`
        return _user_samples(conversations, target, rules)


def _user_samples(
    conversations: Iterable[Conversation], target: str, rules: SampleRules
) -> UserSamples:
    result = UserSamples(samples=[])
    seen: set[tuple] = set()
    for conversation in conversations:
        for index, turn in enumerate(conversation.turns):
            if turn.author != target:
                continue
            result.counts["turns"] += 1
            if len(turn.text) < rules.min_chars:
                result.counts["too_short"] += 1
                continue
            earlier = conversation.turns[:index]
            if all(other.author == target for other in earlier):
                result.counts["no_earlier_turn_by_others"] += 1
                continue
            context = trim_context(earlier, rules)
            key = (turn.text, *((t.author, t.text) for t in context))
            if key in seen:
                result.counts["duplicate"] += 1
                continue
            seen.add(key)
            result.samples.append(Sample(context, turn, conversation.id, conversation.channel_id))
    result.counts["samples"] = len(result.samples)
    return result


def is_validation(conversation_id: str, fraction: float, salt: str) -> bool:
    """A stable coin flip per conversation: the same conversation always lands in the same
    split, even as the workspace grows, so validation never leaks into later training."""
    return _rank(conversation_id, salt) / 2**64 < fraction


def split_samples(
    samples: list[Sample], fraction: float, salt: str
) -> tuple[list[Sample], list[Sample]]:
    """Split by conversation, never putting one conversation in both splits.

    With at least two conversations and a non-zero fraction, each split gets at least one.
    """
    conversations = sorted({sample.conversation_id for sample in samples})
    held_out = {cid for cid in conversations if is_validation(cid, fraction, salt)}
    if fraction > 0 and len(conversations) >= 2:
        if not held_out:
            held_out = {min(conversations, key=lambda cid: _rank(cid, salt))}
        elif held_out == set(conversations):
            held_out.discard(max(conversations, key=lambda cid: _rank(cid, salt)))
    train = [sample for sample in samples if sample.conversation_id not in held_out]
    validation = [sample for sample in samples if sample.conversation_id in held_out]
    return train, validation


def _rank(conversation_id: str, salt: str) -> int:
    digest = hashlib.blake2b(f"{salt}:{conversation_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
