"""Sending one call to a replica of a version: replica choice, one safe retry, passive health.

choose a replica (least outstanding; rendezvous hashing of the routing key when there is
one) among those passive health has not ejected
  → send the InferRequest bytes on its pooled channel
  → refused before any work (not ready, draining, no connection)? one retry on another
    replica; a call that may have run is never retried
  → count the answer in the replica's passive health (UNAVAILABLE, INTERNAL, UNKNOWN
    count against it; a caller's mistake does not)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc

from gateway.forwarder import ChannelPool, ReplicaUnavailable
from gateway.metrics import EJECTIONS, RETRIES
from gateway.outlier import PassiveHealth
from gateway.replica_picker import ConsistentHash, LeastOutstanding, ReplicaPicker
from gateway.router import Route
from gateway.routing_table import Replica

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

# A failure of these codes counts against the replica's passive health; the others (bad
# input, deadline, queue full...) say nothing about whether the replica works.
_REPLICA_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class Dispatcher:
    """Sends calls to replicas (see the module docstring).

    Args:
        pool: Channels to model servers.
        picker: Replica choice for calls without a routing key.
        sticky_picker: Replica choice for calls with a routing key.
        health: Passive health (ejection of failing replicas).
    """

    def __init__(
        self,
        pool: ChannelPool,
        *,
        picker: ReplicaPicker | None = None,
        sticky_picker: ReplicaPicker | None = None,
        health: PassiveHealth | None = None,
    ) -> None:
        self.pool = pool
        self.picker = picker or LeastOutstanding()
        self.sticky = sticky_picker or ConsistentHash(self.picker)
        self.health = health or PassiveHealth(on_eject=lambda r: EJECTIONS.labels(r.server_id).inc())

    async def send(
        self,
        route: Route,
        replicas: Sequence[Replica],
        current: Callable[[], Sequence[Replica]],
        request: bytes,
        timeout_s: float,
        request_id: str,
        *,
        routing_key: str = "",
        callers: int = 1,
    ) -> bytes:
        """Send InferRequest bytes to one replica of `route`; return the InferResponse bytes.

        Args:
            replicas: The version's ready replicas (never empty).
            current: The version's replicas now, for the retry (the table may have moved).
            callers: Callers the call carries (a coalesced call weighs what it carries).

        Raises:
            grpc.aio.AioRpcError: the call failed; relayed to the caller as it is.
        """
        picker = self.sticky if routing_key else self.picker
        replica = picker.choose(self.health.usable(replicas), key=routing_key)
        assert replica is not None  # ready_replicas is never empty
        try:
            return await self._send(replica, request, timeout_s, request_id, callers)
        except ReplicaUnavailable as first:
            retry = picker.choose(self.health.usable(current()), exclude=replica, key=routing_key)
            if retry is None:
                raise first.upstream from None
            log.debug("retrying %s v%s on %s: %s", route.model, route.version, retry.server_id, first)
            RETRIES.labels(route.model).inc()
            try:
                return await self._send(retry, request, timeout_s, request_id, callers)
            except ReplicaUnavailable as second:
                raise second.upstream from None

    async def _send(
        self, replica: Replica, request: bytes, timeout_s: float, request_id: str, callers: int
    ) -> bytes:
        health = self.health
        replica.outstanding += callers
        token = health.started(replica)
        ok = False
        try:
            response = await self.pool.infer(replica.address, request, timeout_s, request_id)
            ok = True
        except ReplicaUnavailable:
            health.failed(replica)
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REPLICA_FAULTS or (
                # It ran past its deadline on the replica: slow, whatever the caller allowed.
                exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s >= health.stall_s
            ):
                health.failed(replica)
            raise
        finally:
            replica.outstanding -= callers
            health.ended(replica, token, ok=ok)
        health.succeeded(replica)
        return response
