"""Passive health of replicas: eject a replica after consecutive failures, or as soon as it
stalls, and probe it back later (Envoy's outlier detection, on the calls this gateway makes).

Nothing is sent just to check health: the gateway's own calls are the probes.

- Consecutive failures: `threshold` failed calls in a row (UNAVAILABLE, INTERNAL, UNKNOWN,
  or a call that ran past its deadline on the replica) eject it.
- Stalls: a replica whose oldest call in flight has waited longer than `stall_s` (or
  `stall_factor` times the replica set's typical latency, when that is longer) while none of
  its calls ended for as long is ejected at once, without waiting for the call to end: a
  hung or frozen process (a gray failure, such as a SIGSTOP) stops getting work within about
  `stall_s` under load, not after its membership record expires. A replica that is merely
  busy still answers calls, and is not a stall.

After `eject_s` an ejected replica is eligible again; its next failure ejects it at once (its
failure count is still over the threshold), its next success clears it. When every replica
is ejected, all of them are used: trying beats refusing everything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from gateway.routing_table import Replica

__all__ = ["PassiveHealth"]

log = logging.getLogger(__name__)


class PassiveHealth:
    """Outlier detection on the calls this gateway makes.

    Args:
        threshold: Consecutive failures that eject a replica.
        eject_s: How long an ejected replica gets no work before it is tried again.
        stall_s: A call in flight this long (at least) marks its replica as stalled.
        stall_factor: ... or this many times the replicas' typical latency, when longer.
        clock: Monotonic clock in seconds (injected by tests).
        on_eject: Called with the replica each time it is ejected (metrics).
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        eject_s: float = 5.0,
        stall_s: float = 0.5,
        stall_factor: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[Replica], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.eject_s = eject_s
        self.stall_s = stall_s
        self.stall_factor = stall_factor
        self._clock = clock
        self._on_eject = on_eject
        self._calls = 0

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def usable(self, replicas: Sequence[Replica]) -> Sequence[Replica]:
        """The replicas that may take work now. When every one is ejected, all of them: a
        cluster-wide failure is better answered by trying than by refusing everything."""
        now = self._clock()
        self._check_stalls(replicas, now)
        if not any(r.ejected_until for r in replicas):
            return replicas
        healthy = [r for r in replicas if r.ejected_until <= now]
        return healthy or replicas

    def started(self, replica: Replica) -> int:
        """A call to `replica` starts; returns its token for `ended`."""
        self._calls += 1
        replica.started[self._calls] = self._clock()
        return self._calls

    def ended(self, replica: Replica, token: int, *, ok: bool) -> None:
        """The call of `token` ended (ok: it answered; its latency feeds the typical one)."""
        start = replica.started.pop(token, None)
        now = self._clock()
        replica.answered_at = now
        if ok and start is not None:
            elapsed = now - start
            typical = replica.latency_s
            replica.latency_s = elapsed if typical is None else 0.9 * typical + 0.1 * elapsed

    def _check_stalls(self, replicas: Sequence[Replica], now: float) -> None:
        if not any(r.started for r in replicas):
            return
        typical = sorted(r.latency_s for r in replicas if r.latency_s is not None)
        limit = self.stall_s
        if typical:
            limit = max(limit, self.stall_factor * typical[len(typical) // 2])
        for replica in replicas:
            if not replica.started or replica.ejected_until > now:
                continue
            oldest = next(iter(replica.started.values()))
            # Stalled: its oldest call has waited past the limit and nothing it was sent has
            # ended for as long (a busy replica still answers; a frozen one answers nothing).
            if now - oldest > limit and now - max(replica.answered_at, oldest) > limit:
                log.warning(
                    "ejecting replica %s (%s) for %.1fs: a call has waited %.2fs on it (limit %.2fs)",
                    replica.server_id,
                    replica.address,
                    self.eject_s,
                    now - oldest,
                    limit,
                )
                replica.failures = max(replica.failures, self.threshold)
                replica.ejected_until = now + self.eject_s
                if self._on_eject is not None:
                    self._on_eject(replica)

    def succeeded(self, replica: Replica) -> None:
        if replica.failures:
            if replica.ejected_until:
                log.info("replica %s (%s) is back", replica.server_id, replica.address)
            replica.failures = 0
            replica.ejected_until = 0.0

    def failed(self, replica: Replica) -> None:
        replica.failures += 1
        if replica.failures >= self.threshold:
            now = self._clock()
            if replica.ejected_until <= now:
                log.warning(
                    "ejecting replica %s (%s) for %.1fs after %d consecutive failures",
                    replica.server_id,
                    replica.address,
                    self.eject_s,
                    replica.failures,
                )
                if self._on_eject is not None:
                    self._on_eject(replica)
            replica.ejected_until = now + self.eject_s
