"""Serving throughput, latency and the cost of switching adapters, against `doppel serve`.

Registers N people, each with a LoRA adapter of the real recipe's shape (rank 16 on every
projection, random non-zero weights: throughput does not depend on what was learned),
in a local MLflow registry, starts `doppel serve --engine E` on it and drives it over HTTP:

- cold switch: a 1-token request to an adapter never used, minus the same request warm;
- warm switch: 1-token requests alternating between two loaded adapters, minus repeating one;
- throughput: R requests, C at a time, all to one adapter, then to N adapters interleaved;
- baseline: the reference's first design, loading base model + adapter for every request.

    python benchmarks/serve.py --engine transformers [--adapters 20] [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from doppel.config import Settings, load_settings
from doppel.consent import grant
from doppel.persona import PersonaCard
from doppel.registry import Registry, model_name
from doppel.store.database import database
from doppel.train.base_model import resolve_base_model
from doppel.train.config import TrainConfig

TEAM = "TBENCH"
PROMPT = [{"role": "user", "content": "Bo: how did the release go, and what is next?"}]


def register_adapters(settings: Settings, count: int) -> list[str]:
    """`count` people with a production adapter each; returns their model ids."""
    registry = Registry(settings)
    recipe = TrainConfig()
    base = resolve_base_model(recipe.base_model, settings.models_dir)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        target_modules=recipe.lora.target_modules,
        init_lora_weights="gaussian",  # non-zero B: each adapter really changes the output
    )
    peft_model = get_peft_model(model, lora)
    ids = []
    for index in range(count):
        user = f"UBENCH{index:03d}"
        ids.append(f"{TEAM}/{user}")
        with database(settings.db_url).transaction() as session:
            grant(session, TEAM, user, "benchmark")  # the catalog serves consenting people only
        if registry.production(model_name(TEAM, user)):
            continue
        torch.manual_seed(index)
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(weight, std=0.02)
        folder = Path(tempfile.mkdtemp()) / "adapter"
        peft_model.save_pretrained(folder)
        prompt = f"You are bench user {index}. Reply the way they would."
        PersonaCard(TEAM, user, prompt, recipe.base_model).write(folder)
        with mlflow.start_run(experiment_id=registry.experiment_id(TEAM)) as run:
            mlflow.log_artifacts(str(folder), "adapter")
        version = registry.register(TEAM, user, run.info.run_id, tags={"benchmark": "serve"})
        registry.promote(model_name(TEAM, user), version, "benchmark")
    return ids


def start_server(settings: Settings, engine: str, port: int, log: Path) -> subprocess.Popen:
    env = os.environ | {
        "DOPPEL_HOME": str(settings.home),
        "DOPPEL_SERVE__MAX_LOADED_ADAPTERS": "32",
        "DOPPEL_SERVE__MAX_GPU_LORAS": "8",
        "DOPPEL_SERVE__MAX_INFLIGHT": "256",
        "DOPPEL_SERVE__MAX_BATCH_SIZE": "16",
    }
    if settings.model_cache:
        env["DOPPEL_MODEL_CACHE"] = str(settings.model_cache)
    doppel = Path(sys.executable).parent / "doppel"
    args = [str(doppel), "serve", "--engine", engine, "--port", str(port)]
    proc = subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"doppel serve exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"doppel serve not ready after 10 minutes; see {log}")


async def timed(
    client: httpx.AsyncClient, url: str, model: str, max_tokens: int
) -> tuple[float, int]:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    response = await client.post(url, json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]


async def switch_costs(url: str, models: list[str], trials: int) -> dict[str, float]:
    """Median extra latency of a cold and of a warm adapter switch (1-token requests)."""
    async with httpx.AsyncClient(timeout=600) as client:
        cold, warm = [], []
        for model in models[-trials:]:  # never used before this point
            first, _ = await timed(client, url, model, 1)
            again, _ = await timed(client, url, model, 1)
            cold.append(first - again)
        a, b = models[0], models[1]
        await timed(client, url, a, 1)
        await timed(client, url, b, 1)
        same, alternating = [], []
        for _ in range(trials):
            same.append((await timed(client, url, a, 1))[0])
            same.append((await timed(client, url, a, 1))[0])
            alternating.append((await timed(client, url, b, 1))[0])
            alternating.append((await timed(client, url, a, 1))[0])
        warm = [statistics.median(alternating) - statistics.median(same)]
    return {
        "cold_switch_ms": round(statistics.median(cold) * 1000, 1),
        "warm_switch_ms": round(warm[0] * 1000, 1),
        "one_token_ms": round(statistics.median(same) * 1000, 1),
    }


async def load(
    url: str, models: list[str], requests: int, concurrency: int, max_tokens: int
) -> dict:
    """R requests, C in flight, cycling through `models`."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(index: int) -> tuple[float, int]:
            async with gate:
                return await timed(client, url, models[index % len(models)], max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - start
    latencies = sorted(seconds for seconds, _ in results)
    tokens = sum(count for _, count in results)
    return {
        "adapters": len(models),
        "p50_s": round(latencies[len(latencies) // 2], 2),
        "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2),
        "tokens_per_s": round(tokens / wall, 1),
    }


def per_request_baseline(settings: Settings, models: list[str], trials: int) -> float:
    """Seconds per request when every request loads the base model and its adapter."""
    from peft import PeftModel

    from doppel.train.base_model import load_model, load_tokenizer
    from serving.catalog import AdapterCatalog
    from serving.prompt import prompt_ids

    catalog = AdapterCatalog(settings)
    catalog.refresh()
    base = resolve_base_model(TrainConfig().base_model, settings.models_dir)
    times = []
    for model in models[:trials]:
        start = time.perf_counter()
        adapter = catalog.resolve(model)
        tokenizer = load_tokenizer(base)
        peft_model = PeftModel.from_pretrained(load_model(base, qlora=False), str(adapter.path))
        ids = prompt_ids(tokenizer, adapter.card, PROMPT, 1024)
        peft_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=1, do_sample=False)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=["vllm", "transformers"], required=True)
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--home", type=Path, default=Path("benchmarks/.serve-home"))
    parser.add_argument("--port", type=int, default=8097)
    args = parser.parse_args()

    settings = load_settings(home=args.home.resolve())
    models = register_adapters(settings, args.adapters + 5)  # 5 kept cold for switch costs
    log = args.home / f"serve-{args.engine}.log"
    server = start_server(settings, args.engine, args.port, log)
    url = f"http://127.0.0.1:{args.port}/v1/chat/completions"
    try:
        costs = asyncio.run(switch_costs(url, models, trials=5))
        hot = models[: args.adapters]
        single = asyncio.run(load(url, hot[:1], args.requests, args.concurrency, args.max_tokens))
        mixed = asyncio.run(load(url, hot, args.requests, args.concurrency, args.max_tokens))
    finally:
        server.terminate()
        server.wait(timeout=120)
    result = {
        "engine": args.engine,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        **costs,
        "single_adapter": single,
        "interleaved": mixed,
        "interleaved_vs_single": round(mixed["tokens_per_s"] / single["tokens_per_s"], 2),
        "load_per_request_baseline_s": per_request_baseline(settings, models, trials=3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
