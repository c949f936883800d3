"""Per-key limits at the gateway: a request rate (token bucket) and calls in flight.

Each key has its own bucket and counter, so one key over its limits is refused
RESOURCE_EXHAUSTED (with RetryInfo saying when a token is back) while every other key's
calls go on unaffected. A key's own limits (set with `modelyard keys create --rate
--concurrency`) win over the gateway's defaults; 0 means no limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter

from modelyard.access.keys import Principal
from modelyard.errors import RateLimited

__all__ = ["KeyLimits", "LIMITED"]

LIMITED = Counter(
    "modelyard_access_limited_total",
    "Calls refused because their key was over its rate or concurrency limit.",
    ["key", "limit"],
)


class _Bucket:
    __slots__ = ("tokens", "stamp", "in_flight")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.in_flight = 0


class KeyLimits:
    """Admission per key.

    Args:
        default_rate_per_s: Requests per second for a key without its own rate; 0: none.
        default_max_concurrency: Calls in flight for a key without its own limit; 0: none.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        default_rate_per_s: float = 0.0,
        default_max_concurrency: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default_rate = default_rate_per_s
        self._default_concurrency = default_max_concurrency
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _limits(self, principal: Principal) -> tuple[float, int]:
        return (
            principal.rate_per_s or self._default_rate,
            principal.max_concurrency or self._default_concurrency,
        )

    def _bucket(self, principal: Principal, rate: float, now: float) -> _Bucket:
        bucket = self._buckets.get(principal.key_id)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()  # bounded memory; idle keys start with full buckets again
            bucket = self._buckets[principal.key_id] = _Bucket(max(rate, 1.0), now)
        return bucket

    def take(self, principal: Principal) -> None:
        """Take one request from the key's rate, or raise RateLimited."""
        if principal.service:
            return
        rate, _ = self._limits(principal)
        if rate <= 0:
            return
        now = self._clock()
        bucket = self._bucket(principal, rate, now)
        burst = max(rate, 1.0)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            LIMITED.labels(principal.name, "rate").inc()
            wait = (1.0 - bucket.tokens) / rate
            raise RateLimited(
                f"{principal.name[:80]} is over its rate of {rate:g} requests/s; retry in {wait:.3f} s",
                retry_after_s=wait,
                metadata={"limit": "rate"},
            )
        bucket.tokens -= 1.0

    def admit(self, principal: Principal, *, rate: bool = True) -> Callable[[], None] | None:
        """Admit one call (its rate token unless `rate` is False, as for a stream whose
        messages take one each, and a concurrency slot): the callable given back must be
        called when it ends; None when the key has no concurrency limit. Raises RateLimited."""
        if principal.service:
            return None
        if rate:
            self.take(principal)
        _, concurrency = self._limits(principal)
        if concurrency <= 0:
            return None
        bucket = self._bucket(principal, 0.0, self._clock())
        if bucket.in_flight >= concurrency:
            LIMITED.labels(principal.name, "concurrency").inc()
            raise RateLimited(
                f"{principal.name[:80]} already has {bucket.in_flight} calls in flight, its limit;"
                " retry when one has finished",
                retry_after_s=0.05,
                metadata={"limit": "concurrency"},
            )
        bucket.in_flight += 1

        def release() -> None:
            bucket.in_flight -= 1

        return release
