"""Requests to prompt token ids, through the very code that renders training samples.

A chat request is the conversation so far, in the shape `render_chat` gives training
samples ("Name: text" user turns, the persona's own turns as assistant). The persona's
trained system prompt is put first unless the request brings its own, and the result is
fitted to the token budget by `fit_prompt`, which drops the oldest turns exactly as
training did. Train/serve skew has nowhere to come from.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from doppel.persona import PersonaCard
from doppel.train.encode import fit_prompt
from doppel.types import ChatMessage


def with_system_prompt(card: PersonaCard | None, messages: list[ChatMessage]) -> list[ChatMessage]:
    """The persona's trained system prompt first, unless the caller sent one."""
    if card is None or (messages and messages[0]["role"] == "system"):
        return list(messages)
    return [{"role": "system", "content": card.system_prompt}, *messages]


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    card: PersonaCard | None,
    messages: list[ChatMessage],
    budget: int,
) -> list[int]:
    """The token ids the engine continues: chat template, generation prompt, trimmed."""
    _, ids = fit_prompt(tokenizer, with_system_prompt(card, messages), budget)
    return ids
