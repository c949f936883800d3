"""The monitor's registry client: a channel to a registry found through membership, and the
canary walk's reads and compare-and-set writes through it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
from google.protobuf import field_mask_pb2

from modelyard.access.client import bearer
from modelyard.coordination import ServiceRecord
from modelyard.errors import Unavailable
from modelyard.tls import ClientTLS, ClientTLSWatch, open_channel
from modelyard.v1 import registry_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from monitor_service.canary import MONITOR_REQUEST_PREFIX, AliasMove, StaleState

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

__all__ = ["RegistryClient"]

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class RegistryClient:
    """Implements `monitor_service.canary.CanaryRegistry` on the registry's gRPC API.

    Args:
        services: The live service records (the collector's latest list).
        tls: The cluster's client TLS, or None.
        token: The monitor's service token, sent as a bearer token.
    """

    def __init__(
        self, services: Callable[[], list[ServiceRecord]], tls: ClientTLS | None, token: str | None
    ) -> None:
        self._services = services
        self._tls = tls
        self._token = token
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Channels opened before the client certificate rotated: closed with the monitor (a
        # registry call is short, and rotations are rare).
        self._retired: list[grpc.aio.Channel] = []
        self._tls_watch = ClientTLSWatch(tls) if tls is not None else None
        self._tls_generation = 0

    def stub(self) -> RegistryServiceAsyncStub:
        """A stub on a registry that is up (found through membership), its channel kept.

        Raises:
            Unavailable: no registry is up.
        """
        registries = [s for s in self._services() if s.kind == "registry" and not s.draining]
        if not registries:
            raise Unavailable("no registry is up")
        address = registries[0].address
        if self._tls_watch is not None and self._tls_watch.generation() != self._tls_generation:
            self._tls_generation = self._tls_watch.generation()
            self._retired += self._channels.values()
            self._channels.clear()
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = open_channel(
                address, self._tls, interceptors=bearer(self._token), client="monitor"
            )
        return RegistryServiceStub(channel)

    async def aclose(self) -> None:
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()

    async def move_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int,
        expected_epoch: int,
        reason: str,
        request_id: str,
        promotion: bool,
    ) -> int:
        kind = (
            registry_pb2.ALIAS_MOVE_KIND_CANARY_PROMOTE
            if promotion
            else registry_pb2.ALIAS_MOVE_KIND_CANARY_ROLLBACK
        )
        request = reg.SetAliasRequest(
            model=model,
            alias=alias,
            version=version,
            expected_version=expected_version,
            expected_epoch=expected_epoch,
            reason=reason,
            request_id=request_id,
            kind=kind,
        )
        try:
            response = await self.stub().SetAlias(request, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.ABORTED:
                raise StaleState(exc.details() or "ABORTED") from exc
            raise
        return int(response.epoch)

    async def set_split(
        self, model: str, split: dict[str, int], *, expected_epoch: int, request_id: str
    ) -> int:
        """Set only the deployment's split (an update mask), at `expected_epoch`: a change by
        anyone since the walk judged is never overwritten."""
        try:
            response = await self.stub().SetDeployment(
                reg.SetDeploymentRequest(
                    model=model,
                    deployment=registry_pb2.Deployment(traffic_split=split),
                    update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
                    request_id=request_id,
                    expected_epoch=expected_epoch,
                ),
                timeout=TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.ABORTED:
                raise StaleState(exc.details() or "ABORTED") from exc
            raise
        return int(response.deployment.epoch)

    async def last_move(self, model: str, aliases: tuple[str, str]) -> AliasMove | None:
        stub = self.stub()
        newest: AliasMove | None = None
        for alias in aliases:
            entries = (
                await stub.ListAliasHistory(
                    reg.ListAliasHistoryRequest(model=model, alias=alias, page_size=1), timeout=TIMEOUT_S
                )
            ).entries
            if entries and (newest is None or entries[0].epoch > newest.epoch):
                entry = entries[0]
                newest = AliasMove(
                    entry.alias,
                    int(entry.to_version),
                    int(entry.epoch),
                    entry.request_id.startswith(MONITOR_REQUEST_PREFIX),
                )
        return newest
