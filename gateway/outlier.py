"""Passive health of replicas: eject a replica after consecutive failures, probe it back later.

Nothing is sent just to check health: the gateway's own calls are the probes. After
`eject_s` an ejected replica is eligible again; its next failure ejects it at once (its
failure count is still over the threshold), its next success clears it.
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
        clock: Monotonic clock in seconds (injected by tests).
        on_eject: Called with the replica each time it is ejected (metrics).
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        eject_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[Replica], None] | None = None,
    ) -> None:
        self.threshold = threshold
        self.eject_s = eject_s
        self._clock = clock
        self._on_eject = on_eject

    def usable(self, replicas: Sequence[Replica]) -> Sequence[Replica]:
        """The replicas that may take work now. When every one is ejected, all of them: a
        cluster-wide failure is better answered by trying than by refusing everything."""
        if not any(r.ejected_until for r in replicas):
            return replicas
        now = self._clock()
        healthy = [r for r in replicas if r.ejected_until <= now]
        return healthy or replicas

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
