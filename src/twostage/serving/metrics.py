"""Request counters and latency histograms for ``GET /metrics``, kept with
``prometheus_client`` in one registry per app (tests and several apps in one process
never share counters).

With several workers each process counts its own requests, as before: a scrape
reaches one worker (prometheus_client's multi-process mode would merge them through
files in a shared directory; not set up here).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["BUCKETS", "CONTENT_TYPE", "Metrics"]

# Seconds; dense below 50 ms where the latency goals live.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: The text exposition format's media type.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """What ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "twostage_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self._errors = Counter(
            "twostage_request_errors",
            "Responses with status >= 400.",
            ["route"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "twostage_request_seconds",
            "Request latency, handler to response.",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._version = Gauge(
            "twostage_model_version",
            "The version each model serves.",
            ["model"],
            registry=self.registry,
        )
        self._failed = Gauge(
            "twostage_model_versions_failed",
            "Versions refused (corrupt, partial).",
            ["model"],
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        self._requests.labels(route=route, method=method, status=str(status)).inc()
        if status >= 400:
            self._errors.labels(route=route).inc()
        self._latency.labels(route=route).observe(seconds)

    def render(self, versions: Iterable[tuple[str, int | None, int]]) -> str:
        """The exposition text; ``versions`` are (model, serving version, failures)."""
        for name, version, failed in versions:
            self._version.labels(model=name).set(version if version is not None else 0)
            self._failed.labels(model=name).set(failed)
        return generate_latest(self.registry).decode()
