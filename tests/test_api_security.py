"""The model API is not open: keys, the admin token, docs, versions, body limits, bad
strings, and the hosts `doppel serve` and `doppel slack-app` agree to listen on.

Two real `doppel serve --engine transformers` on 127.0.0.1, each with an empty registry
(MLflow's SQLite store in its own DOPPEL_HOME): one locked with API keys and an admin
token, one with neither (and its docs on).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st

from doppel.cli.serve import is_loopback
from doppel.config import Settings, load_settings
from doppel.errors import DoppelError
from doppel.persona import PersonaCard
from doppel.train.base_model import load_tokenizer, resolve_base_model
from doppel.train.config import BUNDLED_MODEL
from serving.api import render_prompt
from serving.catalog import AdapterCatalog, UnknownModel, parse_model
from serving.prompt import prompt_ids
from serving.slack.model_client import ModelClient, NoProductionAdapter
from tests.helpers import TEAM, USER, doppel
from tests.servers import BIN, Process, free_port

KEY, OTHER_KEY, ADMIN = "key-one-4f9c2e", "key-two-8d1b7a", "admin-token-3e6f0c"
LIMIT = 4096  # serve.max_request_bytes of the locked server
MODEL = f"{TEAM}/{USER}"
HELLO = [{"role": "user", "content": "Bo: is the deploy going out today?"}]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    url: str
    port: int
    log: Path

    def chat(self, headers: dict[str, str] | None = None, **body: object) -> httpx.Response:
        body = {"model": MODEL, "messages": HELLO, "max_tokens": 4} | body
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def serve(root: Path, models_dir: Path, **settings: str) -> tuple[Api, Process]:
    """`doppel serve --engine transformers` on a free port, configured by `settings`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("DOPPEL_", "MLFLOW_", "SLACK_", "DATABASE_URL"))
    }
    env |= {
        "DOPPEL_HOME": str(root / "home"),
        "DOPPEL_MODEL_CACHE": str(models_dir),
        "DOPPEL_SERVE__REFRESH_SECONDS": "600",  # the empty registry is read once, at start
    } | settings
    port = free_port()
    args = [str(BIN / "doppel"), "serve", "--engine", "transformers", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    server = Process(args, env, root / "serve.log").start(f"{url}/readyz", 300)
    return Api(url, port, root / "serve.log"), server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[list[Api]]:
    """Both servers, started side by side: the locked one and the unlocked one."""
    resolve_base_model(BUNDLED_MODEL, models_dir)  # converted once, before either needs it
    configs = {
        "locked": {  # two keys (in the environment's comma-separated form), a 4 KiB limit
            "DOPPEL_SERVE__API_KEYS": f"{KEY}, {OTHER_KEY}",
            "DOPPEL_SERVE__ADMIN_TOKEN": ADMIN,
            "DOPPEL_SERVE__MAX_REQUEST_BYTES": str(LIMIT),
        },
        "unlocked": {"DOPPEL_SERVE__DOCS": "true"},  # what a laptop runs on 127.0.0.1
    }
    with ThreadPoolExecutor(len(configs)) as pool:
        futures = [
            pool.submit(serve, tmp_path_factory.mktemp(name), models_dir, **config)
            for name, config in configs.items()
        ]
    started = [future.result() for future in futures if not future.exception()]
    try:
        for future in futures:
            future.result()  # a server that did not start fails the tests, the other stopped
        yield [api for api, _ in started]
    finally:
        for _, process in started:
            process.stop()


@pytest.fixture
def locked(servers: list[Api]) -> Api:
    return servers[0]


@pytest.fixture
def unlocked(servers: list[Api]) -> Api:
    return servers[1]


# -- keys ---------------------------------------------------------------------------------


def test_every_route_but_health_and_slack_needs_a_key(locked: Api) -> None:
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/no-such-route"),
    ):
        for headers in ({}, bearer("wrong-key"), {"Authorization": KEY}, bearer(KEY[:-1])):
            refused = httpx.request(method, locked.url + path, headers=headers, timeout=10)
            assert refused.status_code == 401, (path, headers)
            assert refused.headers["www-authenticate"] == "Bearer"
            error = refused.json()["error"]
            assert error["type"] == "unauthorized" and "serve.api_keys" in error["message"]
    for key in (KEY, OTHER_KEY, ADMIN):  # any configured key, and the admin token
        assert httpx.get(f"{locked.url}/v1/models", headers=bearer(key)).status_code == 200
    assert httpx.get(f"{locked.url}/metrics", headers=bearer(OTHER_KEY)).status_code == 200
    assert httpx.get(f"{locked.url}/healthz").json() == {"status": "ok"}
    # Slack signs /slack/*: no key asked (no Slack app here, hence 404 rather than 401).
    assert httpx.post(f"{locked.url}/slack/events", timeout=10).status_code == 404


def test_readyz_without_a_key_says_only_whether_it_is_ready(locked: Api, unlocked: Api) -> None:
    bare = httpx.get(f"{locked.url}/readyz", timeout=10)
    assert bare.status_code == 200 and bare.json() == {"status": "ready"}
    detailed = httpx.get(f"{locked.url}/readyz", headers=bearer(KEY), timeout=10).json()
    assert detailed["status"] == "ready" and detailed["served"] == 0 and detailed["engine"]
    assert "served" in httpx.get(f"{unlocked.url}/readyz", timeout=10).json()  # nothing to hide


def test_docs_are_off_unless_turned_on(locked: Api, unlocked: Api) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(locked.url + path, headers=bearer(KEY)).status_code == 404, path
        assert httpx.get(unlocked.url + path).status_code == 200, path


def test_the_key_never_reaches_the_log(locked: Api) -> None:
    httpx.get(f"{locked.url}/v1/models", headers=bearer("wrong-key-in-the-log?"))
    log = locked.log.read_text()
    assert KEY not in log and OTHER_KEY not in log and ADMIN not in log
    assert "wrong-key-in-the-log?" not in log


# -- the admin token ---------------------------------------------------------------------


def test_admin_routes_need_the_admin_token_and_are_off_without_one(
    locked: Api, unlocked: Api
) -> None:
    reload = f"{locked.url}/admin/reload"
    for headers in ({}, bearer(KEY), bearer("admin")):
        refused = httpx.post(reload, headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
    assert httpx.post(reload, headers=bearer(ADMIN), timeout=30).json()["versions"] == {}

    # No admin token set: never open, even from 127.0.0.1, and the answer says what to do.
    off = httpx.post(f"{unlocked.url}/admin/reload", timeout=30)
    assert off.status_code == 403
    assert "DOPPEL_SERVE__ADMIN_TOKEN" in off.json()["error"]["message"]


def test_explicit_versions_other_than_production_need_the_admin_token(
    locked: Api, unlocked: Api
) -> None:
    challenger = f"{MODEL}@2"
    refused = locked.chat(bearer(KEY), model=challenger)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert unlocked.chat(model=challenger).status_code == 403
    # With the token, on to the catalog, which has nobody: 404.
    assert locked.chat(bearer(ADMIN), model=challenger).json()["error"]["type"] == (
        "model_not_found"
    )


@pytest.mark.parametrize(
    "version", ["0", "00", "-1", "+1", "1.0", "1e3", " 1", "..", "../..", "1/..", "\u0661", ""]
)
def test_a_version_is_a_positive_integer_or_a_404(locked: Api, version: str) -> None:
    for headers in (bearer(KEY), bearer(ADMIN)):
        answer = locked.chat(headers, model=f"{MODEL}@{version}")
        assert answer.status_code == 404, version
        assert "positive integer" in answer.json()["error"]["message"]


def test_versions_are_normalised() -> None:
    assert parse_model(f"{MODEL}@007") == (TEAM, USER, "7")
    assert parse_model(f"{MODEL}@12") == (TEAM, USER, "12")
    assert parse_model(MODEL) == (TEAM, USER, None)
    for bad in (f"{MODEL}@0", f"{TEAM}/../{USER}", f"../{USER}", f"{TEAM}/{USER}\x00"):
        with pytest.raises(UnknownModel):
            parse_model(bad)


def test_the_cache_path_stays_inside_the_cache(settings: Settings) -> None:
    """An adapter planted outside the cache is never loaded, whatever the names say."""
    catalog = AdapterCatalog(settings)
    planted = settings.home.resolve() / "planted"
    planted.mkdir(parents=True)
    PersonaCard(TEAM, USER, "You are someone else.", settings.serve.base_model).write(planted)
    (planted / "adapter_config.json").write_text(json.dumps({"r": 8}))
    for name, version in (("doppel.T.U", "../../planted"), ("..", "planted"), ("x", "..")):
        with pytest.raises(UnknownModel, match="inside the adapter cache"):
            catalog._load(MODEL, name, version)
    assert catalog.cache_dir.is_dir() and PersonaCard.read(planted).user_id == USER  # untouched


# -- bodies --------------------------------------------------------------------------------


def test_a_chunked_body_gets_413_as_soon_as_it_passes_the_limit(locked: Api) -> None:
    """No Content-Length to trust: the bytes are counted as they come, and the 413 is sent
    while the client is still sending (this body never ends)."""
    with socket.create_connection(("127.0.0.1", locked.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {KEY}\r\n".encode()
            + b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 1024
        for _ in range(LIMIT // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = b""
        while received := sock.recv(65536):  # the server closes the connection after it
            answer += received
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"serve.max_request_bytes" in answer


def test_bodies_over_the_limit_get_413_however_they_are_sent(locked: Api) -> None:
    url = f"{locked.url}/v1/chat/completions"
    headers = bearer(KEY) | {"content-type": "application/json"}
    chunks = (b"x" * 512 for _ in range(2 * LIMIT // 512))  # httpx sends a generator chunked
    assert httpx.post(url, content=chunks, headers=headers, timeout=10).status_code == 413
    declared = httpx.post(url, content=b"x" * (LIMIT + 1), headers=headers, timeout=10)
    assert declared.status_code == 413 and declared.json()["error"]["type"] == "request_too_large"
    body = json.dumps({"model": MODEL, "messages": HELLO}).encode()
    small = httpx.post(url, content=iter([body[:10], body[10:]]), headers=headers, timeout=10)
    assert small.status_code == 404  # under the limit, chunked: read, parsed, nobody served


def test_a_lone_surrogate_is_a_422(locked: Api) -> None:
    url = f"{locked.url}/v1/chat/completions"
    headers = bearer(KEY) | {"content-type": "application/json"}
    for body in (
        {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
        {"model": f"{MODEL}\udfff", "messages": HELLO},
        {"model": MODEL, "messages": HELLO, "stop": ["\ud800"]},
        {"model": "\ud83d"},  # invalid twice over, the input echoed in no error
    ):
        answer = httpx.post(url, content=json.dumps(body), headers=headers, timeout=10)
        assert answer.status_code == 422, body
        assert answer.json()["error"]["type"] == "invalid_request_error"


# Text with lone surrogates among ordinary characters, and JSON of any shape.
TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)
MODELS = st.sampled_from([MODEL, f"{MODEL}@1", f"{MODEL}@01", f"{MODEL}@0", "../x@1", "a/b/c"])
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant"]) | JSON, "content": TEXT | JSON}
)
REQUEST = st.fixed_dictionaries(
    {"model": MODELS | TEXT | JSON, "messages": st.lists(MESSAGE, max_size=3) | JSON},
    optional={
        field: JSON | st.integers() | st.floats()
        for field in ("temperature", "top_p", "max_tokens", "stop", "stream", "seed")
    },
)


def test_no_request_body_gets_a_500_or_a_traceback(locked: Api) -> None:
    @hypothesis.settings(max_examples=150, deadline=None, database=None)
    @hypothesis.given(
        body=REQUEST | JSON, raw=st.none() | st.binary(max_size=64), admin=st.booleans()
    )
    def post(body: object, raw: bytes | None, admin: bool) -> None:
        content = raw if raw is not None else json.dumps(body)  # surrogates as \ud800 escapes
        headers = bearer(ADMIN if admin else KEY) | {"content-type": "application/json"}
        answer = http.post("/v1/chat/completions", content=content, headers=headers)
        assert answer.status_code < 500, (content, answer.text)
        assert isinstance(answer.json(), dict)

    with httpx.Client(base_url=locked.url, timeout=30) as http:
        post()
    assert "Traceback" not in locked.log.read_text()


# -- the prompt ------------------------------------------------------------------------------


def test_prompts_trimmed_by_characters_are_the_prompts_fit_prompt_makes(
    settings: Settings,
) -> None:
    tokenizer = load_tokenizer(resolve_base_model(settings.serve.base_model, settings.models_dir))
    card = PersonaCard(TEAM, USER, "You are Alice.", settings.serve.base_model)
    words = "the deploy goes out today after we check the release notes and the dashboards"
    turns = [
        {"role": "assistant" if i % 3 == 2 else "user", "content": f"P{i}: " + words * 20}
        for i in range(24)
    ]  # ~38,000 characters: ~9,000 tokens for a budget of 1,000
    for chat in (HELLO, turns[:3], turns, [{"role": "system", "content": "Be brief."}, *turns]):
        assert render_prompt(tokenizer, card, chat, 1000) == prompt_ids(tokenizer, card, chat, 1000)


# -- the Slack app's client ---------------------------------------------------------------


def test_the_slack_apps_client_sends_its_key(locked: Api) -> None:
    def reply(**sections: dict) -> None:
        client = ModelClient.from_settings(load_settings(**sections), locked.url)
        try:
            client.reply(TEAM, USER, HELLO)
        finally:
            client.close()

    # Authenticated, the model API answers that nobody is served (its 404), not 401.
    with pytest.raises(NoProductionAdapter):
        reply(serve={"api_keys": [OTHER_KEY]})  # the first of serve.api_keys
    with pytest.raises(NoProductionAdapter):
        reply(serve={"api_keys": ["stale"]}, slack_app={"model_api_key": KEY})  # its own first
    for sections in ({}, {"slack_app": {"model_api_key": "stale"}}):
        with pytest.raises(DoppelError) as refused:
            reply(**sections)
        assert "DOPPEL_SLACK_APP__MODEL_API_KEY" in str(refused.value)
        assert "stale" not in str(refused.value)


# -- where the servers listen ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("192.0.2.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# 192.0.2.1 is TEST-NET-1: no machine has it, so nothing here ever listens beyond loopback.
def test_doppel_serve_refuses_a_reachable_host_without_a_key() -> None:
    port = str(free_port())
    refused = doppel("serve", "--host", "192.0.2.1", "--port", port, ok=False)
    assert refused.returncode == 1
    assert "refusing to serve the model API on 192.0.2.1" in refused.stderr
    assert "DOPPEL_SERVE__API_KEYS=" in refused.stderr


def test_doppel_slack_app_refuses_a_reachable_host_without_its_secret_and_key() -> None:
    port = str(free_port())
    for env, missing in (
        ({}, "SLACK_SIGNING_SECRET and DOPPEL_SLACK_APP__MODEL_API_KEY"),
        ({"SLACK_SIGNING_SECRET": "s3cret"}, "without DOPPEL_SLACK_APP__MODEL_API_KEY"),
        ({"DOPPEL_SERVE__API_KEYS": KEY}, "without SLACK_SIGNING_SECRET"),
    ):
        env = {"DOPPEL_SERVE__API_KEYS": "", "DOPPEL_SLACK_APP__MODEL_API_KEY": ""} | env
        refused = doppel("slack-app", "--host", "192.0.2.1", "--port", port, env=env, ok=False)
        assert refused.returncode == 1 and missing in refused.stderr, refused.stderr
        assert "s3cret" not in refused.stderr and KEY not in refused.stderr
