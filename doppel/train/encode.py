"""Chat samples to token ids with the base model's chat template.

Training, evaluation and serving all go through `fit_prompt`/`encode`, so the model is
scored and served on exactly the tokens it was trained on. The loss falls only on the
final assistant turn, up to its end-of-turn token: `labels` is -100 (ignored) for every
context token, and what a template writes after the end of turn (ChatML's newline) is cut.

A message is text, never markup: a special token's string typed into it (`<|im_start|>`,
`<|eot_id|>`, `</s>`, whatever this tokenizer declares) is broken with a zero-width space
before the tokenizer sees it, so no message, from Slack or from an API client, can open
or close a turn.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from doppel.errors import DoppelError
from doppel.types import ChatMessage

IGNORE = -100  # the label value PyTorch's cross-entropy and the trainers skip
ZERO_WIDTH_SPACE = "\u200b"  # invisible to readers, and it splits a token's string


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], *, generation: bool
) -> list[int]:
    specials = special_strings(tokenizer)
    chat = [
        {"role": message["role"], "content": defuse(message["content"], specials)}
        for message in messages
    ]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def special_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every string this tokenizer turns into a special token, longest first."""
    added = (token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return sorted({*tokenizer.all_special_tokens, *added}, key=len, reverse=True)


def defuse(text: str, specials: list[str]) -> str:
    """`text` with each special token's string broken after its first character."""
    for special in specials:
        if special in text:
            text = text.replace(special, special[0] + ZERO_WIDTH_SPACE + special[1:])
    return text


def fit_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: list[ChatMessage], budget: int
) -> tuple[list[ChatMessage], list[int]]:
    """Drop the oldest context turns until the prompt fits `budget` tokens.

    The system prompt and the newest turn always stay, and the chat keeps opening with a
    `user` turn, as chat templates expect. If the newest turn alone is too long, its start
    is cut, keeping the words nearest the reply.
    """
    prompt = list(prompt)
    ids = render(tokenizer, prompt, generation=True)
    while len(ids) > budget and len(prompt) > 2:
        del prompt[1]
        while len(prompt) > 2 and prompt[1]["role"] != "user":
            del prompt[1]
        ids = render(tokenizer, prompt, generation=True)
    while len(ids) > budget and len(prompt[-1]["content"]) > 40:
        text = prompt[-1]["content"]
        prompt[-1] = {**prompt[-1], "content": "…" + text[len(text) // 4 :]}
        ids = render(tokenizer, prompt, generation=True)
    return prompt, ids


def encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], max_length: int
) -> dict[str, list[int]]:
    """`input_ids` and `labels` for one sample (context, then the reply)."""
    prompt, completion = messages[:-1], messages[-1:]
    if not completion or completion[0]["role"] != "assistant":
        raise DoppelError("a training sample must end with an assistant message", "rebuild it")
    reply_ids = len(render(tokenizer, messages, generation=False)) - len(
        render(tokenizer, prompt, generation=True)
    )
    prompt, prompt_ids = fit_prompt(tokenizer, prompt, max(max_length - reply_ids, 8))
    full_ids = render(tokenizer, prompt + completion, generation=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DoppelError(
            "the chat template renders the prompt differently inside the full conversation",
            "use a base model whose chat template is prefix-stable (ChatML, Llama 3, Qwen)",
        )
    full_ids = full_ids[: end_of_reply(tokenizer, full_ids, len(prompt_ids), max_length)]
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "labels": labels}


def end_of_reply(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], reply_start: int, max_length: int
) -> int:
    """Where the sample ends: just after the reply's end-of-turn (eos) token, or at
    `max_length`, where only a reply longer than it loses its end."""
    eos = tokenizer.eos_token_id
    reply = ids[reply_start:max_length]
    return reply_start + reply.index(eos) + 1 if eos in reply else min(len(ids), max_length)


def encode_dataset(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Dataset:
    """Tokenize a split once; the result feeds TRL's trainer and our evaluation alike."""

    def one(example: dict[str, Any]) -> dict[str, list[int]]:
        return encode(tokenizer, example["messages"], max_length)

    return dataset.map(one, remove_columns=dataset.column_names, desc="tokenizing")
