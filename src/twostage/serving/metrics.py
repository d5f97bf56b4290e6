"""Request counters and latency histograms in Prometheus' text format.

Kept in-process and dependency-free: a lock-protected dict of counters per
(route, method, status) and one cumulative histogram per route.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable

__all__ = ["BUCKETS", "Metrics"]

# Seconds; dense below 50 ms where the latency goals live.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(**values: str) -> str:
    body = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in values.items()
    )
    return "{" + body + "}"


class Metrics:
    """What ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = defaultdict(float)
        self._counts: dict[str, int] = defaultdict(int)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one finished request and its latency."""
        with self._lock:
            self._requests[route, method, status] += 1
            buckets = self._buckets.setdefault(route, [0] * (len(BUCKETS) + 1))
            buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sums[route] += seconds
            self._counts[route] += 1

    def render(self, versions: Iterable[tuple[str, int | None, int]]) -> str:
        """The exposition text; ``versions`` are (model, serving version, failures)."""
        lines = [
            "# HELP twostage_requests_total HTTP requests by route, method and status.",
            "# TYPE twostage_requests_total counter",
        ]
        with self._lock:
            for (route, method, status), count in sorted(self._requests.items()):
                labels = _labels(route=route, method=method, status=str(status))
                lines.append(f"twostage_requests_total{labels} {count}")
            lines.append(
                "# HELP twostage_request_errors_total Responses with status >= 400."
            )
            lines.append("# TYPE twostage_request_errors_total counter")
            errors: dict[str, int] = defaultdict(int)
            for (route, _, status), count in self._requests.items():
                if status >= 400:
                    errors[route] += count
            for route, count in sorted(errors.items()):
                lines.append(
                    f"twostage_request_errors_total{_labels(route=route)} {count}"
                )
            lines.append(
                "# HELP twostage_request_seconds Request latency, handler to response."
            )
            lines.append("# TYPE twostage_request_seconds histogram")
            for route, buckets in sorted(self._buckets.items()):
                total = 0
                for bound, count in zip((*BUCKETS, "+Inf"), buckets, strict=True):
                    total += count
                    labels = _labels(route=route, le=str(bound))
                    lines.append(f"twostage_request_seconds_bucket{labels} {total}")
                lines.append(
                    f"twostage_request_seconds_sum{_labels(route=route)} "
                    f"{self._sums[route]:.6f}"
                )
                lines.append(
                    f"twostage_request_seconds_count{_labels(route=route)} "
                    f"{self._counts[route]}"
                )
        lines.append("# HELP twostage_model_version The version each model serves.")
        lines.append("# TYPE twostage_model_version gauge")
        failures = []
        for name, version, failed in versions:
            value = version if version is not None else 0
            lines.append(f"twostage_model_version{_labels(model=name)} {value}")
            failures.append((name, failed))
        lines.append(
            "# HELP twostage_model_versions_failed Versions refused (corrupt, partial)."
        )
        lines.append("# TYPE twostage_model_versions_failed gauge")
        for name, failed in failures:
            lines.append(
                f"twostage_model_versions_failed{_labels(model=name)} {failed}"
            )
        return "\n".join(lines) + "\n"
