"""Bounded worker pools for the Slack app's slow work, mentions apart from commands.

Bolt acknowledges a request, then runs its lazy listeners on one executor. Left as it is,
a burst of mentions (each waiting seconds for the model) would queue `/doppel` behind it,
and its queue would grow without end. So each kind of work gets its own `WorkerPool`:
a few threads, and a short backlog beyond which work is refused at once and the requester
is told the app is busy. Bolt's own executor keeps only acks and those busy notices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import NamedTuple, ParamSpec, TypeVar

from slack_bolt import App
from slack_bolt.lazy_listener import ThreadLazyListenerRunner
from slack_bolt.request import BoltRequest

P = ParamSpec("P")
T = TypeVar("T")


class PoolFull(RuntimeError):
    """Every worker is busy and the backlog is full."""


class WorkerPool(Executor):
    """A thread pool that holds at most `workers` running and `backlog` waiting tasks;
    `submit` beyond that raises `PoolFull` instead of queueing."""

    def __init__(self, name: str, workers: int, backlog: int) -> None:
        self.name = name
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix=f"slack-{name}")
        self._slots = threading.BoundedSemaphore(workers + backlog)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if not self._slots.acquire(blocking=False):
            raise PoolFull(f"the {self.name} pool is full")
        try:
            future = self._threads.submit(fn, *args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._threads.shutdown(wait=wait, cancel_futures=cancel_futures)


class Route(NamedTuple):
    runner: ThreadLazyListenerRunner  # Bolt's runner, on one of our pools
    busy: Callable[..., None]  # a listener (Bolt injects its arguments) that says "busy"


class PooledLazyRunner(ThreadLazyListenerRunner):
    """Bolt's lazy listener runner, starting each lazy listener on the pool routed to it
    (`route`), and any other on `default`. When the pool is full, the route's `busy`
    listener runs instead, on Bolt's executor. It installs itself in `bolt` (Bolt takes
    one executor only, through `App(listener_executor=...)`)."""

    def __init__(self, bolt: App, default: WorkerPool, busy: Callable[..., None]) -> None:
        listeners = bolt.listener_runner
        super().__init__(listeners.logger, listeners.listener_executor)
        self._default = self._route(default, busy)
        self._routes: dict[Callable[..., None], Route] = {}
        listeners.lazy_listener_runner = self

    def route(
        self, listener: Callable[..., None], pool: WorkerPool, busy: Callable[..., None]
    ) -> None:
        self._routes[listener] = self._route(pool, busy)

    def start(self, function: Callable[..., None], request: BoltRequest) -> None:
        route = self._routes.get(function, self._default)
        try:
            route.runner.start(function, request)
        except PoolFull as full:
            self.logger.warning("%s: refused with a busy notice", full)
            super().start(route.busy, request)

    def _route(self, pool: WorkerPool, busy: Callable[..., None]) -> Route:
        return Route(ThreadLazyListenerRunner(self.logger, pool), busy)
