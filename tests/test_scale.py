"""Serving past 100 people. MLflow answers a listing 100 items at a time: everything that
lists pages to the end, and a refresh costs one call per 100 people, not one per person.

105 people are registered with real PEFT adapters (rank 1 on the served base model, so
registering is quick) in MLflow's SQLite store, which a real MLflow tracking server then
serves; a proxy in front of it counts every HTTP call the code under test makes."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devtools.adapters import AdapterMaker, register_adapters
from devtools.counting_proxy import CountingProxy
from doppel.config import Settings, load_settings
from doppel.registry import model_name
from serving.catalog import AdapterCatalog
from serving.engines.vllm_engine import max_cpu_loras
from tests.helpers import doppel, last_json
from tests.servers import BIN, Process, free_port, mlflow_server

PEOPLE = 105  # person 101 onwards is on the second page of every listing
WORKSPACE = "TSCALE"
KEY, ADMIN = "scale-tests-key", "scale-tests-admin"
CLIENT = {"Authorization": f"Bearer {KEY}"}
OPERATOR = {"Authorization": f"Bearer {ADMIN}"}  # /admin/*, and versions named explicitly
SEARCH = "GET /api/2.0/mlflow/registered-models/search"


@dataclass
class World:
    root: Path
    settings: Settings  # MLflow through the counting proxy
    proxy: CountingProxy
    models: list[str]  # "<workspace_id>/<user_id>", sorted

    def private(self, home: Path, **serve: object) -> Settings:
        """A catalog's own adapter cache, with these serve settings; consent is shared."""
        limits = self.settings.serve.model_copy(update=serve)
        shared = {"database_url": self.settings.db_url}
        return self.settings.model_copy(update={"home": home, "serve": limits, **shared})

    def name(self, index: int) -> str:
        return model_name(*self.models[index].split("/"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    root = tmp_path_factory.mktemp("scale")
    store = root / "mlflow"
    store.mkdir()
    # Registering straight into the SQLite store takes a fifth of the time it takes through
    # the server; the server started on it afterwards is what the code under test calls.
    direct = load_settings(
        home=root / "home",
        mlflow_tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
        model_cache=models_dir,
    )
    models = register_adapters(direct, WORKSPACE, PEOPLE, rank=1, target_modules=["q_proj"])
    port = free_port()
    mlflow = mlflow_server(store, port).start(f"http://127.0.0.1:{port}/health", 180)
    proxy = CountingProxy(f"http://127.0.0.1:{port}").start()
    settings = direct.model_copy(update={"mlflow_tracking_uri": proxy.url})
    yield World(root, settings, proxy, models)
    proxy.stop()
    mlflow.stop()


@pytest.fixture(scope="module")
def api(world: World):
    """`doppel serve` on the 105 people, without prefetching, so downloads are on demand."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOPPEL_", "MLFLOW_"))}
    env |= {
        "DOPPEL_HOME": str(world.root / "serve-home"),
        "DATABASE_URL": world.settings.db_url,
        "DOPPEL_MODEL_CACHE": str(world.settings.models_dir),
        "MLFLOW_TRACKING_URI": world.proxy.url,
        "DOPPEL_SERVE__PREFETCH": "0",
        "DOPPEL_SERVE__REFRESH_SECONDS": "3600",  # refreshes only when the test asks
        "DOPPEL_SERVE__API_KEYS": KEY,
        "DOPPEL_SERVE__ADMIN_TOKEN": ADMIN,
    }
    args = [str(BIN / "doppel"), "serve", "--engine", "transformers", "--port", str(port)]
    server = Process(args, env, world.root / "serve.log")
    server.start(f"http://127.0.0.1:{port}/readyz", 300)
    server.url = f"http://127.0.0.1:{port}"
    yield server
    server.stop()


def chat(api: Process, model: str, headers: dict[str, str] = CLIENT) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Bo: ready?"}]}
    return httpx.post(
        f"{api.url}/v1/chat/completions",
        json=body | {"max_tokens": 2, "temperature": 0},
        headers=headers,
        timeout=120,
    )


@pytest.mark.slow
def test_a_refresh_reads_everyone_in_one_call_per_100_people(world: World, tmp_path: Path):
    catalog = AdapterCatalog(world.private(tmp_path))
    world.proxy.reset()
    catalog.refresh()
    pages = math.ceil(PEOPLE / 100)
    assert dict(world.proxy.calls) == {"GET /health": 1, SEARCH: pages}  # no download either
    assert [model.model_id for model in catalog.served()] == world.models


@pytest.mark.slow
def test_person_101_onwards_is_listed_and_served(api: Process, world: World):
    cache = world.root / "serve-home" / "serve-cache"
    assert not list(cache.glob("doppel.*/*")), "ready only once every adapter was downloaded"
    listed = httpx.get(f"{api.url}/v1/models", headers=CLIENT, timeout=30).json()["data"]
    assert [model["id"] for model in listed] == world.models
    answer = chat(api, world.models[-1])
    assert answer.status_code == 200, answer.text
    assert answer.json()["system_fingerprint"] == f"{world.name(-1)}@1"
    world.proxy.reset()
    assert chat(api, world.models[-1]).status_code == 200
    assert world.proxy.total() == 0  # from the cache


@pytest.mark.slow
def test_a_refresh_keeps_the_cached_adapters_of_person_101_onwards(api: Process, world: World):
    """Asked for by version (as an operator may), person 104's adapter is cached; a refresh
    that saw only the first 100 people took them for opted out and deleted it."""
    answer = chat(api, f"{world.models[-2]}@1", OPERATOR)
    assert answer.status_code == 200, answer.text
    cached = world.root / "serve-home" / "serve-cache" / world.name(-2) / "1"
    assert (cached / "adapter_model.safetensors").is_file()
    world.proxy.reset()
    reload = httpx.post(f"{api.url}/admin/reload", headers=OPERATOR, timeout=60).json()
    assert cached.is_dir(), "a refresh deleted the adapter of person 104 as if they had left"
    assert reload["mlflow_reachable"] and reload["served"] == PEOPLE
    assert world.proxy.total() <= math.ceil(PEOPLE / 100) + 1, dict(world.proxy.calls)


@pytest.mark.slow
def test_doppel_models_lists_everyone_in_a_few_calls(world: World):
    env = {
        "DOPPEL_HOME": str(world.settings.home),
        "DATABASE_URL": world.settings.db_url,
        "MLFLOW_TRACKING_URI": world.proxy.url,
    }
    world.proxy.reset()
    rows = last_json(doppel("models", "--json", env=env))
    assert isinstance(rows, list)
    assert [row["name"] for row in rows] == [world.name(i) for i in range(PEOPLE)]
    assert all(row["production"] == 1 and row["versions"][0]["run_id"] for row in rows)
    # health, then pages of: models, versions, experiments, runs (for their metrics)
    assert world.proxy.total() <= 4 * math.ceil(PEOPLE / 100) + 2, dict(world.proxy.calls)


@pytest.mark.slow
def test_concurrent_first_requests_download_an_adapter_once(world: World, tmp_path: Path):
    catalog = AdapterCatalog(world.private(tmp_path))
    catalog.refresh()
    world.proxy.reset()
    with ThreadPoolExecutor(8) as pool:
        adapters = list(pool.map(lambda _: catalog.resolve(world.models[102]), range(8)))
    assert len({(adapter.lora_id, adapter.path) for adapter in adapters}) == 1
    assert world.proxy.calls["GET /api/2.0/mlflow/model-versions/get"] == 1  # one download


@pytest.mark.slow
def test_the_disk_cache_stays_under_its_bound_least_recently_used_out(world: World, tmp_path: Path):
    probe = AdapterCatalog(world.private(tmp_path / "probe"))
    probe.refresh()
    size = max(_size(probe.resolve(model).path) for model in world.models[:3])
    bound = 3.5 * size  # three adapters fit, not four
    catalog = AdapterCatalog(world.private(tmp_path / "bounded", max_cache_gb=bound / 1e9))
    catalog.refresh()

    def on_disk() -> set[int]:
        return {i for i in range(PEOPLE) if (catalog.cache_dir / world.name(i) / "1").is_dir()}

    held = catalog.acquire(world.models[0])  # a request in flight holds it all along
    for model in world.models[1:8]:
        catalog.resolve(model)
        assert catalog.cache.usage()["bytes"] <= bound
    assert on_disk() == {0, 6, 7}  # the one in use, and the two used last
    catalog.resolve(world.models[6])
    catalog.resolve(world.models[1])  # fetched again; 7 is now the least recently used
    assert on_disk() == {0, 6, 1}
    catalog.release(held)
    catalog.resolve(world.models[2])
    assert on_disk() == {6, 1, 2}
    assert catalog.cache.usage()["adapters"] == 3


@pytest.mark.slow
def test_prefetch_downloads_ahead_into_free_space_only(world: World, tmp_path: Path):
    catalog = AdapterCatalog(world.private(tmp_path / "roomy"))
    catalog.refresh()
    assert catalog.prefetch(3) == 3 and catalog.cache.usage()["adapters"] == 3
    size = max(_size(catalog.resolve(model).path) for model in world.models[:3])
    tight = AdapterCatalog(world.private(tmp_path / "tight", max_cache_gb=2.5 * size / 1e9))
    tight.refresh()
    assert tight.prefetch(10) == 2  # a third would not fit, and prefetching never evicts


@pytest.mark.slow
def test_a_superseded_version_leaves_the_cache(world: World, tmp_path: Path):
    """Last in this module: it promotes a second version of person 102."""
    catalog = AdapterCatalog(world.private(tmp_path, keep_superseded_minutes=0))
    catalog.refresh()
    old = catalog.resolve(world.models[101])
    workspace_id, user_id = world.models[101].split("/")
    version = AdapterMaker(world.settings, 1, ["q_proj"]).publish(workspace_id, user_id, seed=7)
    catalog.refresh()
    assert version == "2" and not old.path.exists()
    assert catalog.resolve(world.models[101]).version == "2"
    assert catalog.resolve(world.models[100]).version == "1"  # others stay as they were


def test_vllm_keeps_as_many_adapters_as_host_memory_holds(settings: Settings):
    """SmolLM2-135M: an adapter of rank 16 on every projection is 9.8 MB in bf16."""
    smollm = {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    }
    per_adapter = 16 * 10176 * 30 * 2
    assert max_cpu_loras(settings.serve, smollm, 16, available=40 * per_adapter) == 10
    assert max_cpu_loras(settings.serve, smollm, 16, available=0) == settings.serve.max_gpu_loras
    one_gib = settings.serve.model_copy(update={"adapter_memory_gib": 1.0})
    assert max_cpu_loras(one_gib, smollm, 16, available=0) == 2**30 // per_adapter == 109


def _size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())
