"""The gateway's own Prometheus metrics: requests per model / version / alias / status, the
routing table's health, replica ejections, retries and shadow comparisons (their outcome, and
the size of the difference: `ShadowDiffs`).

Label children are bound once per label set and cached: `labels()` costs more than the
increment itself on the Predict path.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from modelyard.telemetry import LATENCY_BUCKETS_S

__all__ = [
    "REQUESTS",
    "REQUEST_SECONDS",
    "ROUTING_DEGRADED",
    "ROUTING_AGE_SECONDS",
    "EJECTIONS",
    "RETRIES",
    "SHADOW_COMPARISONS",
    "SHADOW_ABS_DIFF",
    "SHADOW_ABS_DIFF_MAX",
    "SHADOW_ABS_DIFF_BUCKETS",
    "SHADOW_DIFF_WINDOW_S",
    "RequestMetrics",
    "ShadowDiffs",
]

REQUESTS = Counter(
    "modelyard_gateway_requests",
    "Predict and ModelInfer calls routed by the gateway, by model, served version, alias "
    "(empty when the caller named a version) and gRPC status.",
    ["model", "version", "alias", "code"],
)
REQUEST_SECONDS = Histogram(
    "modelyard_gateway_request_seconds",
    "Time the gateway spent on a routed call, from its arrival to the answer.",
    ["model", "version", "alias"],
    buckets=LATENCY_BUCKETS_S,
)
ROUTING_DEGRADED = Gauge(
    "modelyard_gateway_routing_degraded",
    "1 while Redis is unreachable and the gateway routes from its last known table.",
    ["gateway"],
)
ROUTING_AGE_SECONDS = Gauge(
    "modelyard_gateway_routing_table_refreshed_timestamp_seconds",
    "Unix time of the last successful routing table refresh from Redis.",
    ["gateway"],
)
EJECTIONS = Counter(
    "modelyard_gateway_replica_ejections",
    "Times a replica was ejected by passive health (consecutive failures).",
    ["server_id"],
)
RETRIES = Counter(
    "modelyard_gateway_retries",
    "Calls retried on another replica after a refusal that did no work.",
    ["model"],
)
SHADOW_COMPARISONS = Counter(
    "modelyard_gateway_shadow_comparisons",
    "Mirrored calls by outcome: match (outputs close), mismatch, or error.",
    ["model", "version", "shadow_version", "outcome"],
)
SHADOW_ABS_DIFF_BUCKETS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0)
"""Decades around the default tolerances (shadow_atol 1e-5): float32 noise lands in the
lowest buckets, other weights in the top half."""
SHADOW_ABS_DIFF = Histogram(
    "modelyard_gateway_shadow_abs_diff",
    "Per compared mirrored call, the largest absolute difference between a shadow output and "
    "the served one (comparisons whose outputs had the same shapes).",
    ["model", "version", "shadow_version"],
    buckets=SHADOW_ABS_DIFF_BUCKETS,
)
SHADOW_DIFF_WINDOW_S = 30.0
"""How far back SHADOW_ABS_DIFF_MAX looks: longer than any scrape interval, so that every
comparison is in the gauge at one scrape at least."""
SHADOW_ABS_DIFF_MAX = Gauge(
    "modelyard_gateway_shadow_abs_diff_max",
    f"The largest modelyard_gateway_shadow_abs_diff of the last {SHADOW_DIFF_WINDOW_S:.0f} s "
    "(NaN when there was no comparison in that time).",
    ["model", "version", "shadow_version"],
)


class RequestMetrics:
    """Cached children of REQUESTS and REQUEST_SECONDS."""

    def __init__(self) -> None:
        self._seconds: dict[tuple[str, str, str], Any] = {}
        self._counts: dict[tuple[str, str, str, str], Any] = {}

    def observe(self, model: str, version: str, alias: str, code: str, seconds: float) -> None:
        """Count one call. The labels must be bounded by the caller: models and versions the
        routing table knows, or "unknown"."""
        key = (model, version, alias)
        histogram = self._seconds.get(key)
        if histogram is None:
            if len(self._seconds) > 10_000:  # unbounded model names must not leak memory
                self._seconds.clear()
            histogram = self._seconds[key] = REQUEST_SECONDS.labels(model, version, alias)
        histogram.observe(seconds)
        count_key = (model, version, alias, code)
        counter = self._counts.get(count_key)
        if counter is None:
            if len(self._counts) > 10_000:
                self._counts.clear()
            counter = self._counts[count_key] = REQUESTS.labels(model, version, alias, code)
        counter.inc()


class ShadowDiffs:
    """The largest shadow difference of the recent past, per label set, as a gauge.

    A histogram gives a window's maximum only to its bucket's bound; the monitor wants the
    value itself, so each label set keeps its maxima per whole second of the last `window_s`
    (at most `window_s` entries, however many comparisons) and the gauge reads them when
    /metrics is scraped. That read runs on the metrics server's thread, hence the lock.

    Args:
        gauge: The labelled gauge to publish through (SHADOW_ABS_DIFF_MAX).
        window_s: How far back the gauge looks.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        gauge: Gauge,
        window_s: float = SHADOW_DIFF_WINDOW_S,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gauge = gauge
        self._window_s = window_s
        self._clock = clock
        self._seconds: dict[tuple[str, str, str], collections.deque[tuple[int, float]]] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, version: str, shadow_version: str, diff: float) -> None:
        """Record one comparison's largest absolute difference (NaN is ignored)."""
        if math.isnan(diff):
            return
        key = (model, version, shadow_version)
        second = int(self._clock())
        with self._lock:
            entries = self._seconds.get(key)
            if entries is None:
                entries = self._seconds[key] = collections.deque()
                self._gauge.labels(*key).set_function(lambda: self.max(*key))
            if entries and entries[-1][0] == second:
                entries[-1] = (second, max(entries[-1][1], diff))
            else:
                entries.append((second, diff))
            self._prune(entries)

    def max(self, model: str, version: str, shadow_version: str) -> float:
        """The largest difference of the last `window_s` seconds, or NaN."""
        with self._lock:
            entries = self._seconds.get((model, version, shadow_version))
            if not entries:
                return math.nan
            self._prune(entries)
            return max((diff for _second, diff in entries), default=math.nan)

    def _prune(self, entries: collections.deque[tuple[int, float]]) -> None:
        oldest = self._clock() - self._window_s
        while entries and entries[0][0] + 1 <= oldest:
            entries.popleft()
