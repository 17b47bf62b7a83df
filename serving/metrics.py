"""Prometheus metrics of the model API, in a registry of the app's own."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from serving.catalog import AdapterCatalog
from serving.engines.base import Engine

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "doppel_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "doppel_request_seconds",
            "Request latency",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "doppel_time_to_first_token_seconds",
            "Time to the first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("doppel_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("doppel_completion_tokens", "Tokens generated", registry=r)
        self.inflight = Gauge("doppel_inflight_requests", "Completions in flight", registry=r)
        self.rejected = Counter("doppel_rejected", "Completions refused as overload", registry=r)

    def watch(self, engine: Engine, catalog: AdapterCatalog) -> None:
        self.registry.register(_EngineCollector(engine, catalog))


class _EngineCollector(Collector):
    """Adapter cache figures, read from the engine and catalog at scrape time."""

    def __init__(self, engine: Engine, catalog: AdapterCatalog) -> None:
        self.engine, self.catalog = engine, catalog

    def collect(self) -> Iterator:
        stats = self.engine.stats
        for name, help_text, value in (
            ("doppel_adapter_loads", "Adapters brought into memory (cold)", stats.loads),
            ("doppel_adapter_cache_hits", "Requests whose adapter was in memory", stats.hits),
            ("doppel_adapter_evictions", "Adapters evicted, least recently used", stats.evictions),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily(
            "doppel_served_adapters", "Production adapters served", value=len(self.catalog.served())
        )
        yield GaugeMetricFamily(
            "doppel_mlflow_reachable",
            "1 when the last registry refresh worked",
            value=float(self.catalog.mlflow_reachable),
        )
