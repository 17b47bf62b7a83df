"""Mean negative log-likelihood of the real replies given their contexts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset

from doppel.train.encode import IGNORE


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, encoded: Dataset, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean NLL over completion tokens (the reply), in nats per token.

    Every model is scored on the same pre-tokenized rows, so the numbers compare. `model` is
    any causal LM whose output has `logits`: a base model, or a PeftModel with its adapters.
    """
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        ids = pad(batch["input_ids"], pad_id).to(device)
        attention = pad([[1] * len(row) for row in batch["input_ids"]], 0).to(device)
        labels = pad(batch["labels"], IGNORE).to(device)[:, 1:]
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)
