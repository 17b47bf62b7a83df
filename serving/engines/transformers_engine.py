"""transformers + PEFT, for machines without vLLM.

The base model is loaded once and each adapter is added to the same `PeftModel` under
its own name, "lora<id>" (PEFT names are module keys, so no dots). One worker thread
owns the model: it takes every waiting request with the same sampling settings, up to
`max_batch_size`, and decodes them together, with PEFT's `adapter_names=` routing each
row through its own adapter (or none, for "__base__"). Tokens go back to each request
as they are produced.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import cast

import torch
from peft import PeftModel
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from doppel.config import Settings
from doppel.train.base_model import load_model, load_tokenizer
from serving.catalog import Adapter
from serving.engines.base import AdapterStats, Delta, SamplingOptions

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass(eq=False)
class _Job:
    """One request as the worker thread sees it."""

    prompt: list[int]
    adapter: Adapter | None
    options: SamplingOptions
    loop: asyncio.AbstractEventLoop
    deltas: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded reply already sent
    done: bool = False
    cancelled: bool = False

    def send(self, item: Delta | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, item)

    def batch_key(self) -> tuple:
        o = self.options
        return (o.temperature, o.top_p, o.stop, o.seed)


class TransformersEngine:
    name = "transformers"

    def __init__(self, settings: Settings, base_path: str) -> None:
        self.serve = settings.serve
        self.base_path = base_path
        self.stats = AdapterStats()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._loaded: OrderedDict[str, None] = OrderedDict()  # adapter keys, LRU first
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        def load() -> None:
            self.tokenizer = load_tokenizer(self.base_path)
            self.model = load_model(self.base_path, qlora=False).eval()

        await asyncio.to_thread(load)
        eos = self.model.generation_config.eos_token_id
        self._eos = {self.tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else eos or [])}
        self._thread = threading.Thread(target=self._work, name="doppel-generate", daemon=True)
        self._thread.start()

    async def generate(
        self, request_id: str, prompt: list[int], adapter: Adapter | None, options: SamplingOptions
    ) -> AsyncGenerator[Delta, None]:
        job = _Job(prompt, adapter, options, asyncio.get_running_loop())
        self._jobs.put(job)
        try:
            while True:
                item = await job.deltas.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            job.cancelled = True  # the worker drops the row at its next step

    async def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    # -- the worker thread -----------------------------------------------------------------

    def _work(self) -> None:
        pending: deque[_Job] = deque()
        while not self._stopping.is_set():
            if not pending:  # idle: wait for work (briefly, to notice `close`)
                try:
                    pending.append(self._jobs.get(timeout=0.1))
                except queue.Empty:
                    continue
            while not self._jobs.empty():
                pending.append(self._jobs.get_nowait())
            batch = self._take_batch(pending)
            try:
                self._decode(batch)
            except Exception as error:
                for job in batch:
                    job.send(error)

    def _take_batch(self, pending: deque[_Job]) -> list[_Job]:
        """The oldest request plus those that can share its decode loop."""
        first = pending[0]
        batch: list[_Job] = []
        adapters: set[str] = set()
        for job in list(pending):
            if job.cancelled:
                pending.remove(job)
                continue
            key = _peft_name(job.adapter)
            fits = key in adapters or len(adapters) < self.serve.max_loaded_adapters
            if job.batch_key() == first.batch_key() and fits:
                batch.append(job)
                adapters.add(key)
                pending.remove(job)
            if len(batch) == self.serve.max_batch_size:
                break
        return batch

    def _decode(self, batch: list[_Job]) -> None:
        if not batch:
            return
        names = [self._ensure_adapter(job.adapter) for job in batch]
        pad = self.tokenizer.pad_token_id
        width = max(len(job.prompt) for job in batch)
        ids = [[pad] * (width - len(job.prompt)) + job.prompt for job in batch]
        mask = [[0] * (width - len(job.prompt)) + [1] * len(job.prompt) for job in batch]
        options = batch[0].options
        kwargs = {}
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = names
        if options.seed is not None:
            torch.manual_seed(options.seed)
        with torch.inference_mode():
            self.model.generate(
                input_ids=torch.tensor(ids, device=self.model.device),
                attention_mask=torch.tensor(mask, device=self.model.device),
                max_new_tokens=max(job.options.max_tokens for job in batch),
                do_sample=options.temperature > 0,
                temperature=options.temperature if options.temperature > 0 else None,
                top_p=options.top_p if options.temperature > 0 else None,
                top_k=None,
                pad_token_id=pad,
                streamer=_RowStreamer(self, batch),
                stopping_criteria=StoppingCriteriaList([_RowsFinished(batch)]),
                **kwargs,
            )
        for job in batch:
            if not job.done:
                self._finish(job, "length")

    def _ensure_adapter(self, adapter: Adapter | None) -> str:
        """Bring the adapter into the PeftModel unless it is there; evict the LRU one."""
        name = _peft_name(adapter)
        if adapter is None:
            return name
        if name in self._loaded:
            self.stats.hits += 1
            self._loaded.move_to_end(name)
            return name
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(adapter.path), adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=name)
            self.model.eval()
        self.stats.loads += 1
        self._loaded[name] = None
        while len(self._loaded) > self.serve.max_loaded_adapters:
            evicted, _ = self._loaded.popitem(last=False)
            with warnings.catch_warnings():
                # Requests name their adapter (`adapter_names=`), so PEFT's "active" adapter
                # means nothing here; its notice that it moved would only be noise in logs.
                warnings.filterwarnings("ignore", "Adapter .* was active which is now deleted")
                self.model.delete_adapter(evicted)
            self.stats.evictions += 1
        return name

    # -- per-row streaming -------------------------------------------------------------------

    def on_token(self, job: _Job, token: int) -> None:
        """One new token for one row: send the text it completes, or finish the row."""
        if token in self._eos:
            self._finish(job, "stop")
            return
        job.tokens.append(token)
        text = self._text(job)
        cut = _first_stop(text, job.options.stop)
        if cut is not None:
            self._finish(job, "stop", text[:cut])
            return
        if len(job.tokens) >= job.options.max_tokens:
            self._finish(job, "length", text)
            return
        held = max((len(stop) - 1 for stop in job.options.stop), default=0)
        ready = len(text) - held - (1 if text.endswith("\ufffd") else 0)  # half a character
        if ready > job.sent:
            job.send(Delta(text[job.sent : ready], 1))
            job.sent = ready

    def _finish(self, job: _Job, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self._text(job)
            cut = _first_stop(text, job.options.stop)
            text = text if cut is None else text[:cut]
        job.done = True
        job.send(Delta(text[job.sent :], 0, reason))

    def _text(self, job: _Job) -> str:
        # One flat list of ids decodes to one string; a list of strings is for a batch of lists.
        return cast(str, self.tokenizer.decode(job.tokens, skip_special_tokens=True))


class _RowStreamer(BaseStreamer):
    """Receives each decoding step's tokens for the whole batch and routes them by row."""

    def __init__(self, engine: TransformersEngine, batch: list[_Job]) -> None:
        self.engine, self.batch, self.prompt_seen = engine, batch, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for job, token in zip(self.batch, value.reshape(-1).tolist(), strict=True):
            if not job.done and not job.cancelled:
                self.engine.on_token(job, token)

    def end(self) -> None:
        pass


class _RowsFinished(StoppingCriteria):
    """Per row: finished (stop string, own max_tokens, EOS) or abandoned by its client."""

    def __init__(self, batch: list[_Job]) -> None:
        self.batch = batch

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        done = [job.done or job.cancelled for job in self.batch]
        # torch.BoolTensor is the legacy name of a bool tensor: torch.tensor() is typed Tensor.
        return cast(torch.BoolTensor, torch.tensor(done, dtype=torch.bool, device=input_ids.device))


def _peft_name(adapter: Adapter | None) -> str:
    return BASE if adapter is None else f"lora{adapter.lora_id}"


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(stop) for stop in stops if stop and stop in text]
    return min(hits) if hits else None
