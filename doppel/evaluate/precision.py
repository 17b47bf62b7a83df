"""The precision the base model is scored in: by default, the one the model API serves in.

A QLoRA adapter is trained on a 4-bit NF4 base, but both serving engines put it on a
bfloat16 (or, with transformers on CPU, float32) base. The gate must score the model
people will talk to, so evaluation loads the base the way serving does unless
`evaluate.precision` says otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from doppel.config import Settings
from doppel.train.base_model import load_model
from doppel.train.device import model_dtype

Precision = Literal["bfloat16", "float16", "float32"]  # the names torch and vLLM share


def evaluation_precision(settings: Settings) -> str:
    """`evaluate.precision`, with "serve" resolved to what serving computes in."""
    chosen = settings.evaluate.precision
    return serving_precision(settings.serve.engine) if chosen == "serve" else chosen


def serving_precision(engine: str, cuda: bool | None = None) -> Precision:
    """The dtype `doppel serve --engine ENGINE` runs the base model in, on this machine.

    It follows serving/engines: `auto` is vLLM where it is installed. On CUDA both engines
    compute in `model_dtype()` (bfloat16, or float16 before Ampere). On CPU the transformers
    engine loads the base with `load_model(qlora=False)`, in float32, while vLLM is started
    with dtype="bfloat16". `cuda` defaults to whether this machine has a GPU."""
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        return "bfloat16" if model_dtype(cuda=True) is torch.bfloat16 else "float16"
    return "bfloat16" if engine == "vllm" else "float32"


def load_base(path: str, precision: str) -> PreTrainedModel:
    """The base model in `precision`: a torch dtype name, or "nf4" (QLoRA's 4-bit base)."""
    if precision == "nf4":
        return load_model(path, qlora=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, precision))
    if not torch.cuda.is_available():
        return model
    # transformers wraps `to` in functools.wraps, whose stub hides the bound `self` from mypy.
    return model.to("cuda")  # type: ignore[arg-type]
