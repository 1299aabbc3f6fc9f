"""Prometheus metrics, one registry per app (tests build many apps; no global collectors)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "deepfeat_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "deepfeat_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "deepfeat_errors", "Error responses by stable error code", ["code"], registry=self.registry
        )
        self.batch_size = Histogram(
            "deepfeat_embed_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.forward_seconds = Histogram(
            "deepfeat_forward_seconds",
            "Model forward pass time",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.index_size = Gauge("deepfeat_index_size", "Images in the store", registry=self.registry)

    def track_index_size(self, count: Callable[[], int]) -> None:
        """Read the store's size at scrape time rather than updating it on every write."""
        self.index_size.set_function(lambda: float(count()))


class MetricsMiddleware:
    """Counts and times every request by route template (``/v1/images/{image_id}``, not the raw path,
    so ids do not explode the label cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method=method, route=template, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=template).observe(time.perf_counter() - started)
