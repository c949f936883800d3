"""The gateway's own Prometheus metrics: requests per model / version / alias / status, the
routing table's health, replica ejections, retries and shadow comparisons.

Label children are bound once per label set and cached: `labels()` costs more than the
increment itself on the Predict path.
"""

from __future__ import annotations

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
    "RequestMetrics",
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
