"""Prometheus metrics of one app instance, in its own registry.

Each app gets a fresh `CollectorRegistry`, so several apps in one process
(tests) do not collide. With several uvicorn workers every worker counts its
own requests and `GET /metrics` returns the numbers of the worker that served it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SEARCH_STAGES = ("decode", "preprocess", "embed", "search", "rerank")


class ServiceMetrics:
    """Request counts and latencies per route template, stage timings, catalog size and errors."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "idml_http_requests",
            "HTTP requests by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "idml_http_request_duration_seconds",
            "Time from the first request byte to the last response byte, seconds",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "idml_search_stage_duration_seconds",
            "Time of each /search stage (decode, preprocess, embed, search, rerank), seconds",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "idml_errors",
            "Error responses by error code (the `code` of the error body)",
            ["code"],
            registry=self.registry,
        )
        self.catalog_items = Gauge(
            "idml_catalog_items", "Items in the catalog", registry=self.registry
        )
        self.embed_batch_size = Histogram(
            "idml_embed_batch_size",
            "Queries embedded per model call by the micro-batcher",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.indexed_items = Counter(
            "idml_indexed_items",
            "Items processed by POST /index and index jobs, by outcome (added, replaced, error)",
            ["status"],
            registry=self.registry,
        )
        # `labels()` takes a lock and builds a key on each call, about 3 us; the hot paths use cached children.
        self.stage_children = {stage: self.stage.labels(stage) for stage in SEARCH_STAGES}
        self._request_children: dict[tuple[str, str, int], tuple] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency under its method, route template and status."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
