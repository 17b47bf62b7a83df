"""Chat samples to token ids with the base model's chat template.

Training, evaluation and serving all go through `fit_prompt`/`encode`, so the model is
scored and served on exactly the tokens it was trained on. The loss falls only on the
final assistant turn: `labels` is -100 (ignored) for every context token.
"""

from __future__ import annotations

from typing import Any, cast

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from doppel.errors import DoppelError
from doppel.types import ChatMessage

IGNORE = -100  # the label value PyTorch's cross-entropy and the trainers skip


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage], *, generation: bool
) -> list[int]:
    # A ChatMessage is a dict of str to str; mypy keeps TypedDicts apart from dict[str, str].
    chat = cast("list[dict[str, str]]", messages)
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
    full_ids = full_ids[:max_length]  # only a reply longer than max_length loses its end
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "labels": labels}


def encode_dataset(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> Dataset:
    """Tokenize a split once; the result feeds TRL's trainer and our evaluation alike."""

    def one(example: dict[str, Any]) -> dict[str, list[int]]:
        return encode(tokenizer, example["messages"], max_length)

    return dataset.map(one, remove_columns=dataset.column_names, desc="tokenizing")
