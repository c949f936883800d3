"""The gateway's core: selector → version → replica → forward, with one safe retry.

No grpc here beyond what the forwarder raises; the servicer adapts it to the wire.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.forwarder import ChannelPool, ReplicaUnavailable, append_version
from gateway.replica_picker import LeastOutstanding, ReplicaPicker
from gateway.routing_table import RoutingTable
from modelyard.errors import InvalidArgument, NoReadyReplica
from modelyard.v1 import inference_service_pb2

__all__ = ["Router"]

log = logging.getLogger(__name__)


class Router:
    """Routes Predict calls by the current routing table.

    Args:
        pool: Channels to model servers.
        default_alias: Alias used when a request selects nothing.
        picker: Replica choice strategy.
    """

    def __init__(
        self,
        pool: ChannelPool,
        *,
        default_alias: str = "production",
        picker: ReplicaPicker | None = None,
    ) -> None:
        self.table = RoutingTable()
        self._pool = pool
        self._default_alias = default_alias
        self._picker = picker or LeastOutstanding()

    def select(self, model: str, version: int, alias: str) -> int:
        """The version a selector means now."""
        if not model:
            raise InvalidArgument("model is required", field="model")
        return self.table.resolve(model, version, alias or self._default_alias)

    async def predict(self, raw_request: bytes, timeout_s: float, request_id: str) -> bytes:
        """Route one PredictRequest (as bytes) and return the PredictResponse bytes."""
        request = inference_service_pb2.PredictRequest.FromString(raw_request)
        model = request.model
        version = self.select(model, request.version, request.alias)
        replicas = self.table.ready_replicas(model, version)
        forwarded = append_version(raw_request, version)

        replica = self._picker.choose(replicas)
        assert replica is not None  # ready_replicas is never empty
        try:
            return await self._send(replica, forwarded, timeout_s, request_id)
        except ReplicaUnavailable as first:
            # The replica refused before doing any work: one retry on another replica.
            retry = self._picker.choose(self.table.replicas.get((model, version), []), exclude=replica)
            if retry is None:
                raise first.upstream from None
            log.info("retrying %s v%s on %s: %s", model, version, retry.server_id, first)
            try:
                return await self._send(retry, forwarded, timeout_s, request_id)
            except ReplicaUnavailable as second:
                raise second.upstream from None

    async def _send(self, replica: Any, request: bytes, timeout_s: float, request_id: str) -> bytes:
        replica.outstanding += 1
        try:
            return await self._pool.infer(replica.address, request, timeout_s, request_id)
        finally:
            replica.outstanding -= 1

    def metadata(self, model: str, version: int, alias: str) -> tuple[int, dict[str, Any], str, list[str]]:
        """(version, signature as JSON dict, platform, aliases) of a selected version."""
        resolved = self.select(model, version, alias)
        entry = self.table.signatures.get((model, resolved))
        if entry is None:
            raise NoReadyReplica(
                f"no model server has {model} v{resolved} loaded, so its signature is not known "
                "yet; retry shortly",
                retry_after_s=0.5,
            )
        signature, platform = entry
        return resolved, signature, platform, self.table.aliases_of(model, resolved)
