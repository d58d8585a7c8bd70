"""The HTTP API's Prometheus metrics: requests by route and status, latency, refusals.

``ApiMetrics`` owns the metric objects of one app and their exposition (``GET /metrics``, the
Prometheus text format); ``MetricsMiddleware`` times every request at the ASGI layer. Routes are
labelled by their template (``/v1/jobs/{job_id}``), never the concrete path, so the number of
series stays bounded whatever callers send; a path no route matches is ``unmatched``.

Several API processes behind one port (``keel api --workers N``) each count their own requests;
``keel api`` then points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before it starts
them, and any process's ``/metrics`` answers with the sum over all of them (prometheus_client's
multiprocess mode). Without that variable a process reports only itself, which is what one
process behind one port needs.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE", "MULTIPROC_ENV", "ApiMetrics", "MetricsMiddleware"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set (before the processes start) to share metrics between the processes of one port."""

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds; dense below 50 ms, where the API's latency targets are, up to the longest wait."""


class ApiMetrics:
    """One app's metrics, in a registry of their own (so several apps in a process never clash)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keel_api_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "keel_api_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method and route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "keel_api_rate_limited",
            "Requests refused by a rate limit (per_key or per_tenant).",
            ["limit"],
            registry=self.registry,
        )
        self.quota_refused = Counter(
            "keel_api_quota_refused",
            "Job submissions refused by a tenant's daily quota (jobs_per_day or usd_per_day).",
            ["quota"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format: all processes' in multiprocess mode."""
        if os.environ.get(MULTIPROC_ENV):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Count and time every HTTP request (a plain ASGI middleware: no per-request task)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; count and time it when its response has gone out."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before it responds

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = _route_template(scope)
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
