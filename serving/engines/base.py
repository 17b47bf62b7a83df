"""The one small interface both engines implement.

An engine turns prompt token ids plus an optional adapter into a stream of text deltas.
It owns the base model and the adapters in memory; the catalog owns which adapter is
right for a request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from serving.catalog import Adapter


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

    async def start(self) -> None:
        """Load the base model. Adapters come later, each on its first request (`generate`
        reads `adapter.path`, which the catalog holds on disk until the request ends)."""

    def generate(
        self, request_id: str, prompt: list[int], adapter: Adapter | None, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        """Stream the reply; closing the generator (`aclose`) frees the request's slot."""

    async def close(self) -> None: ...
