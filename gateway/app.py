"""The gateway's composition root: settings → Redis → router → servicer → server."""

from __future__ import annotations

from gateway.forwarder import ChannelPool
from gateway.router import Router
from gateway.routing_sync import RoutingSync
from gateway.servicer import SERVICE_NAME, InferenceServicer
from gateway.settings import GatewaySettings
from modelyard import __version__
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.membership import Heartbeat, new_service_id
from modelyard.rpc.server import ServiceServer, create_server

__all__ = ["GatewayApp"]


class GatewayApp:
    """A gateway process: `await start()`, serve, `await aclose()`."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.service_id = settings.service_id or new_service_id("gateway")
        self.store = CoordinationStore(settings.redis)
        self.pool = ChannelPool(max_message_bytes=settings.server.max_message_bytes)
        self.router = Router(self.pool, default_alias=settings.default_alias)
        self.sync = RoutingSync(
            self.store, self.router, self.pool, resync_interval_s=settings.resync_interval_s
        )
        self.servicer = InferenceServicer(self.router, default_timeout_s=settings.default_timeout_s)
        self.server: ServiceServer = create_server(
            settings.server,
            settings.tls,
            service_names=[SERVICE_NAME],
            register=self.servicer.register,
        )
        self.heartbeat = Heartbeat(
            self.store,
            self._record,
            interval_s=settings.server.heartbeat_interval_s,
            ttl_s=settings.server.heartbeat_ttl_s,
        )
        self._closed = False

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    def _record(self) -> ServiceRecord:
        return ServiceRecord(
            id=self.service_id,
            kind="gateway",
            address=self.server.address,
            metrics_address=self.server.metrics_address,
            software_version=__version__,
            start_time=self.heartbeat.start_time,
            draining=False,
        )

    async def start(self) -> None:
        await self.store.open()
        await self.sync.start()
        await self.server.start()
        await self.heartbeat.start()
        await self.server.set_serving(True)

    async def aclose(self) -> None:
        """Drain: NOT_SERVING → leave the cluster → finish in-flight calls → close clients.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.server.health.enter_graceful_shutdown()
        await self.heartbeat.aclose()
        await self.server.drain()
        await self.sync.aclose()
        await self.pool.aclose()
        await self.store.aclose()


