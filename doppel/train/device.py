"""What this machine computes with: the float type of models, and bitsandbytes' presence.

Training, evaluation and serving all ask here, so that one machine never trains in one
precision and serves in another.
"""

from __future__ import annotations

import importlib.util

import torch

from doppel.errors import DoppelError
from doppel.train.config import BITSANDBYTES_OPTIMIZERS


def model_dtype(cuda: bool | None = None, bf16_native: bool | None = None) -> torch.dtype:
    """bf16 on GPUs that compute in it natively (compute capability 8.0 and later: A100,
    RTX 30xx/40xx, H100), fp16 on older ones (T4, V100), where vLLM refuses bf16 and torch
    only emulates it; float32 on CPU, where neither half type is faster.

    `torch.cuda.is_bf16_supported()` alone says yes on a T4 too (it counts emulation), so
    native support is asked for. `cuda` and `bf16_native` default to this machine's answers.
    """
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return torch.float32
    if bf16_native is None:
        bf16_native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_native else torch.float16


def require_bitsandbytes(needed_for: str, instead: str) -> None:
    """Fail before any model loads when bitsandbytes is absent: without it, transformers
    fails deep inside `from_pretrained`, or the optimizer at the first step, naming no fix."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise DoppelError(
            f"{needed_for} needs bitsandbytes, which is not installed",
            "make install installs it for CPU, make install-gpu with the GPU set "
            f"(pip install -e '.[gpu]'); or set {instead}",
        )


def require_optimizer(optimizer: str, cuda: bool) -> None:
    """bitsandbytes' 8-bit and paged optimizers are the GPU recipes': refused on CPU, and
    checked to be installed on CUDA."""
    if optimizer not in BITSANDBYTES_OPTIMIZERS:
        return
    if not cuda:
        raise DoppelError(
            f"optimizer: {optimizer} needs a CUDA GPU",
            "use optimizer: adamw_torch_fused on CPU, or run on a GPU worker",
        )
    require_bitsandbytes(f"optimizer: {optimizer}", "optimizer: adamw_torch_fused")
