"""The Slack app's model API client against several replicas over real HTTP: requests
spread over them in turn, and fail over when one is down, starting or busy.

The replicas here are small HTTP servers that answer in the model API's shape and count
what they get; `tests/test_stack.py` runs the same client against real `doppel serve`
replicas."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from devtools.emulator import serve_in_thread
from doppel.errors import DoppelError
from serving.slack.model_client import ModelClient
from tests.helpers import TEAM, USER
from tests.servers import free_port

HELLO = [{"role": "user", "content": "Bo: hello?"}]


class Replica:
    """A model API stand-in that answers `status` (200: a completion naming it)."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.name, self.status, self.hits = name, status, 0
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.complete)
        self.url = ""

    async def complete(self) -> JSONResponse:
        self.hits += 1
        if self.status != 200:
            return JSONResponse({"error": {"type": "busy"}}, status_code=self.status)
        return JSONResponse({"choices": [{"message": {"content": f" {self.name} "}}]})


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    """Three replicas on 127.0.0.1, all answering until a test says otherwise."""
    group = [Replica("a"), Replica("b"), Replica("c")]
    with ExitStack() as stack:
        for replica in group:
            replica.url = stack.enter_context(serve_in_thread(replica.app)).removesuffix("/api/")
        yield group


def client(*urls: str) -> ModelClient:
    return ModelClient(",".join(urls), timeout=10, api_key="key")


def test_requests_take_the_replicas_in_turn(replicas: list[Replica]) -> None:
    model = client(*(r.url for r in replicas))
    answers = [model.reply(TEAM, USER, HELLO) for _ in range(6)]
    model.close()
    assert answers == ["a", "b", "c", "a", "b", "c"]
    assert [r.hits for r in replicas] == [2, 2, 2]


def test_a_replica_that_is_down_is_skipped(replicas: list[Replica]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    model = client(dead, replicas[0].url)
    assert [model.reply(TEAM, USER, HELLO) for _ in range(4)] == ["a"] * 4
    assert model._order() == [replicas[0].url, dead]  # cooling down: tried last
    model.close()


def test_starting_and_busy_replicas_hand_over(replicas: list[Replica]) -> None:
    starting, busy, up = replicas
    starting.status, busy.status = 503, 429
    model = client(starting.url, busy.url, up.url)
    assert [model.reply(TEAM, USER, HELLO) for _ in range(3)] == ["c"] * 3
    model.close()
    assert starting.hits == 1  # 503: skipped while it cools down
    assert busy.hits == 2  # 429: asked again on its next turn


def test_when_no_replica_answers_the_error_names_each(replicas: list[Replica]) -> None:
    replicas[0].status = 503
    dead = f"http://user:hunter2@127.0.0.1:{free_port()}"
    model = client(replicas[0].url, dead)
    with pytest.raises(DoppelError) as failed:
        model.reply(TEAM, USER, HELLO)
    model.close()
    message = str(failed.value)
    assert message.startswith("no model API replica answered")
    assert f"{replicas[0].url}: 503" in message and "user:***@127.0.0.1" in message
    assert "hunter2" not in message and "DOPPEL_SERVING_URL" in message


def test_the_last_replica_busy_is_the_answer(replicas: list[Replica]) -> None:
    replicas[0].status = 429
    model = client(replicas[0].url)
    with pytest.raises(DoppelError) as failed:
        model.reply(TEAM, USER, HELLO)
    model.close()
    assert "answered 429" in str(failed.value)


@pytest.mark.parametrize("setting", ["", " , ", "127.0.0.1:8000", "http://a:1,ftp://b"])
def test_a_bad_serving_url_is_named(setting: str) -> None:
    with pytest.raises(DoppelError) as bad:
        ModelClient(setting)
    assert "DOPPEL_SERVING_URL" in str(bad.value)
