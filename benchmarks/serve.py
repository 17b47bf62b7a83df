"""Serving N people: start-up, refreshes, cold and warm requests, throughput, against
`doppel serve` over HTTP.

Registers N people (`--people`), each with a LoRA adapter of the real recipe's shape
(rank 16 on every linear layer, random non-zero weights: what is measured does not depend
on what was learned), straight into a SQLite MLflow store; then starts a real MLflow
tracking server on that store, a counting proxy in front of it, and `doppel serve
--engine E` behind that, with prefetching off so that first requests really are cold.
People registered by an earlier run on the same `--home` are kept: 10, then 100, then
1000 registers 1000 in all. Each run serves from an empty adapter cache.

- ready: seconds from starting `doppel serve` to its first 200 on /readyz;
- refresh: POST /admin/reload (re-read every `production` alias), its time and the MLflow
  HTTP calls it made, counted at the proxy;
- cold / warm: 1-token requests to people never asked before (download, load, answer),
  then to the same people again; p50 and p99. The cold switch is the median difference.
  One person is asked first, apart, to pay the engine's one-off costs;
- warm switch: 1-token requests alternating between two loaded adapters, minus repeating one;
- throughput: R requests, C at a time, all to one person, then each to a person drawn at
  random from all N;
- rss: the server's resident memory at the end;
- baseline: the reference's first design, loading base model and adapter per request.

    python benchmarks/serve.py --people 100 [--engine transformers] [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from devtools.adapters import register_adapters
from devtools.counting_proxy import CountingProxy
from doppel.config import Settings, load_settings
from doppel.persona import PersonaCard
from doppel.registry import tracking_uri
from doppel.train.base_model import load_model, load_tokenizer, resolve_base_model
from serving.prompt import prompt_ids

TEAM = "TBENCH"
PROMPT = [{"role": "user", "content": "Bo: how did the release go, and what is next?"}]
ADMIN = "benchmark-admin"
BIN = Path(sys.executable).parent


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600) -> float:
    """Seconds until `url` answers 200, polled every 0.1 s."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"{url} not ready after {timeout} s; see {log}")


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_mlflow(settings: Settings, port: int) -> subprocess.Popen:
    """A real MLflow tracking server on the store the people were registered in."""
    log = settings.home / "mlflow.log"
    args = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", tracking_uri(settings),
        "--default-artifact-root", (settings.home.resolve() / "mlartifacts").as_uri(),
    ]  # fmt: skip
    proc = start(args, os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, log)
    wait_ready(proc, f"http://127.0.0.1:{port}/health", log)
    return proc


def start_server(
    settings: Settings, engine: str, port: int, mlflow_url: str, home: Path
) -> tuple[subprocess.Popen, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOPPEL_", "MLFLOW_"))}
    env |= {
        "DOPPEL_HOME": str(home),
        "DATABASE_URL": settings.db_url,  # consent, as registered
        "DOPPEL_MODEL_CACHE": str(settings.models_dir),
        "MLFLOW_TRACKING_URI": mlflow_url,
        "DOPPEL_SERVE__ADMIN_TOKEN": ADMIN,
        "DOPPEL_SERVE__PREFETCH": "0",  # every first request is cold
        "DOPPEL_SERVE__REFRESH_SECONDS": "3600",  # refreshes are the benchmark's, counted
        "DOPPEL_SERVE__MAX_LOADED_ADAPTERS": "32",
        "DOPPEL_SERVE__MAX_GPU_LORAS": "8",
        "DOPPEL_SERVE__MAX_INFLIGHT": "256",
        "DOPPEL_SERVE__MAX_BATCH_SIZE": "16",
        "DOPPEL_SERVE__REQUEST_TIMEOUT_SECONDS": "1800",  # measured, however slow
    }
    log = home / f"serve-{engine}.log"
    home.mkdir(parents=True, exist_ok=True)
    args = [str(BIN / "doppel"), "serve", "--engine", engine, "--port", str(port)]
    proc = start(args, env, log)
    return proc, wait_ready(proc, f"http://127.0.0.1:{port}/readyz", log)


def refreshes(url: str, proxy: CountingProxy, times: int) -> dict[str, float]:
    """Median seconds of a refresh, and the MLflow calls each made."""
    seconds, calls = [], []
    for _ in range(times):
        proxy.reset()
        start = time.perf_counter()
        answer = httpx.post(
            f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600
        )
        seconds.append(time.perf_counter() - start)
        answer.raise_for_status()
        calls.append(proxy.total())
    return {"refresh_s": round(statistics.median(seconds), 3), "refresh_mlflow_calls": max(calls)}


async def timed(
    client: httpx.AsyncClient, url: str, model: str, max_tokens: int
) -> tuple[float, int]:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_s": round(statistics.median(ordered), 3), "p99_s": round(p99, 3)}


async def first_requests(url: str, models: list[str]) -> dict:
    """1-token requests to people never asked before, then to the same people again."""
    async with httpx.AsyncClient(timeout=600) as client:
        cold, warm = [], []
        for model in models:
            cold.append((await timed(client, url, model, 1))[0])
            warm.append((await timed(client, url, model, 1))[0])
    return {
        "cold": percentiles(cold),
        "warm": percentiles(warm),
        "cold_switch_ms": round(
            statistics.median([c - w for c, w in zip(cold, warm, strict=True)]) * 1000, 1
        ),
    }


async def warm_switch(url: str, a: str, b: str, trials: int) -> dict[str, float]:
    """Median extra latency of alternating two loaded adapters over repeating one."""
    async with httpx.AsyncClient(timeout=600) as client:
        await timed(client, url, a, 1)
        await timed(client, url, b, 1)
        same, alternating = [], []
        for _ in range(trials):
            same.append((await timed(client, url, a, 1))[0])
            same.append((await timed(client, url, a, 1))[0])
            alternating.append((await timed(client, url, b, 1))[0])
            alternating.append((await timed(client, url, a, 1))[0])
    return {
        "warm_switch_ms": round(
            (statistics.median(alternating) - statistics.median(same)) * 1000, 1
        ),
        "one_token_ms": round(statistics.median(same) * 1000, 1),
    }


async def load(url: str, models: list[str], concurrency: int, max_tokens: int) -> dict:
    """Every request in `models`, C in flight."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(model: str) -> tuple[float, int]:
            async with gate:
                return await timed(client, url, model, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(model) for model in models))
        wall = time.perf_counter() - start
    return {
        "people": len(set(models)),
        **percentiles([seconds for seconds, _ in results]),
        "tokens_per_s": round(sum(tokens for _, tokens in results) / wall, 1),
    }


def rss_gib(pid: int) -> float:
    """Resident memory of the process and its children (vLLM's engine core), in GiB."""
    total, pids = 0, [pid]
    while pids:
        current = pids.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(
                next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
            )
            for task in Path(f"/proc/{current}/task").iterdir():
                pids += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return round(total / 2**20, 2)


def per_request_baseline(settings: Settings, adapters: list[Path]) -> float:
    """Seconds per request when every request loads the base model and its adapter."""
    base = resolve_base_model(settings.serve.base_model, settings.models_dir)
    times = []
    for adapter in adapters:
        start = time.perf_counter()
        tokenizer = load_tokenizer(base)
        model = PeftModel.from_pretrained(load_model(base, qlora=False), str(adapter))
        ids = prompt_ids(tokenizer, PersonaCard.read(adapter), PROMPT, 1024)
        model.generate(input_ids=torch.tensor([ids]), max_new_tokens=1, do_sample=False)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--people", type=int, default=25, help="registered personas (>= 3)")
    parser.add_argument("--engine", choices=["vllm", "transformers"], default="transformers")
    parser.add_argument("--cold", type=int, default=10, help="people asked for the first time")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--home", type=Path, default=Path("benchmarks/.serve-home"))
    parser.add_argument("--port", type=int, default=8097)
    args = parser.parse_args()

    settings = load_settings(home=args.home.resolve())
    started = time.perf_counter()
    models = register_adapters(settings, TEAM, args.people)
    registered_s = time.perf_counter() - started
    mlflow = start_mlflow(settings, args.port + 1)
    proxy = CountingProxy(f"http://127.0.0.1:{args.port + 1}").start()
    home = args.home.resolve() / f"serve-{args.people}-{int(time.time())}"
    server, ready_s = start_server(settings, args.engine, args.port, proxy.url, home)
    url = f"http://127.0.0.1:{args.port}"
    draw = random.Random(0)
    warmup, *others = draw.sample(models, len(models))
    cold_set = others[: args.cold]
    spread = [draw.choice(models) for _ in range(args.requests)]
    try:
        refresh = refreshes(url, proxy, times=3)
        asyncio.run(first_requests(url, [warmup]))  # the engine's one-off costs, not a switch's
        first = asyncio.run(first_requests(url, cold_set))
        switch = asyncio.run(warm_switch(url, cold_set[0], cold_set[1], trials=5))
        single = asyncio.run(
            load(url, [cold_set[0]] * args.requests, args.concurrency, args.max_tokens)
        )
        mixed = asyncio.run(load(url, spread, args.concurrency, args.max_tokens))
        rss = rss_gib(server.pid)
        ready = httpx.get(f"{url}/readyz", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    finally:
        server.terminate()
        server.wait(timeout=120)
        proxy.stop()
        mlflow.terminate()
        mlflow.wait(timeout=60)
    cached = sorted(home.glob("serve-cache/doppel.*/*"))
    result = {
        "engine": args.engine,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "load_average": [round(load, 1) for load in os.getloadavg()],  # others' work too
        "people": args.people,
        "registered_s": round(registered_s, 1),
        "ready_s": round(ready_s, 2),
        **refresh,
        "rss_gib": rss,
        "cache": ready["cache"],
        **first,
        **switch,
        "single_adapter": single,
        "spread_over_all": mixed,
        "spread_vs_single": round(mixed["tokens_per_s"] / single["tokens_per_s"], 2),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
    }
    result["load_per_request_baseline_s"] = per_request_baseline(settings, cached[:3])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
