"""The gateway's composition root: settings → Redis → routing table → data plane → servicers →
server. It only wires."""

from __future__ import annotations

import grpc

from gateway.dataplane import GatewayDataPlane
from gateway.forwarder import ChannelPool
from gateway.metrics import EJECTIONS
from gateway.oip_servicer import OIP_SERVICE_NAME, OipGatewayServicer
from gateway.outlier import PassiveHealth
from gateway.routing_sync import RoutingSync
from gateway.servicer import SERVICE_NAME, InferenceServicer
from gateway.settings import GatewaySettings
from modelyard import __version__
from modelyard.access import AccessControl, KeyLimits
from modelyard.access.sync import KeySync
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.membership import Heartbeat, new_service_id
from modelyard.rpc.server import NOT_SERVING, SERVING, ServiceServer, create_server
from modelyard.tasks import BackgroundTasks
from modelyard.tls import ClientTLS

__all__ = ["GatewayApp", "ROUTING_HEALTH_SERVICE"]

ROUTING_HEALTH_SERVICE = "modelyard.gateway.Routing"
"""grpc.health.v1 service name that is NOT_SERVING while the routing table is degraded (Redis
unreachable, routing from the last known table). The gateway itself stays SERVING."""


class GatewayApp:
    """A gateway process: `await start()`, serve, `await aclose()`."""

    name = "gateway"

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.service_id = settings.service_id or new_service_id("gateway")
        self.store = CoordinationStore(settings.redis)
        self.access = AccessControl(
            settings.access,
            kind="gateway",
            limits=KeyLimits(
                default_rate_per_s=settings.access.default_rate_per_s,
                default_max_concurrency=settings.access.default_max_concurrency,
            ),
        )
        self.key_sync = KeySync(
            self.store, self.access.book, interval_s=settings.access.key_refresh_interval_s
        )
        self._tasks = BackgroundTasks()
        self.pool = ChannelPool(
            max_message_bytes=settings.server.max_message_bytes,
            tls=ClientTLS.from_settings(settings.tls),
            call_metadata=self.access.call_metadata(),
        )
        self.sync = RoutingSync(
            self.store,
            self.pool,
            resync_interval_s=settings.resync_interval_s,
            name=self.service_id,
            on_degraded=self._routing_degraded,
        )
        self.dataplane = GatewayDataPlane.build(
            self.pool,
            self.sync,
            default_alias=settings.default_alias,
            health=PassiveHealth(
                threshold=settings.eject_after_failures,
                eject_s=settings.eject_s,
                on_eject=lambda replica: EJECTIONS.labels(replica.server_id).inc(),
            ),
            shadow_rtol=settings.shadow_rtol,
            shadow_atol=settings.shadow_atol,
            shadow_max_in_flight=settings.shadow_max_in_flight,
            shadow_record_size=settings.shadow_record_size,
            access_log_enabled=settings.server.access_log_enabled,
            coalesce=settings.coalesce_enabled,
            coalesce_max_items=settings.coalesce_max_items,
            coalesce_max_in_flight=settings.coalesce_max_in_flight,
        )
        self.servicer = InferenceServicer(self.dataplane, default_timeout_s=settings.default_timeout_s)
        self.oip_servicer = OipGatewayServicer(
            self.dataplane,
            default_timeout_s=settings.default_timeout_s,
            ready=lambda: not self._closed,
        )
        self._closed = False
        self.server: ServiceServer = create_server(
            settings.server,
            settings.tls,
            service_names=[SERVICE_NAME, OIP_SERVICE_NAME],
            register=self._register,
            kind="gateway",
            access=self.access,
        )
        self.heartbeat = Heartbeat(
            self.store,
            self._record,
            interval_s=settings.server.heartbeat_interval_s,
            ttl_s=settings.server.heartbeat_ttl_s,
        )

    def _register(self, server: grpc.aio.Server) -> None:
        self.servicer.register(server)
        self.oip_servicer.register(server)

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
            metrics_scheme=self.server.metrics_scheme,
            software_version=__version__,
            start_time=self.heartbeat.start_time,
            draining=False,
        )

    async def _routing_degraded(self, degraded: bool) -> None:
        if not self._closed:
            await self.server.health.set(ROUTING_HEALTH_SERVICE, NOT_SERVING if degraded else SERVING)

    async def start(self) -> None:
        await self.store.open()
        if self.access.enforced:
            await self.key_sync.refresh()
            self._tasks.spawn("key-sync", self.key_sync.run_forever)
        await self.sync.start()
        await self.server.start()
        await self.heartbeat.start()
        await self.server.set_serving(True)
        await self._routing_degraded(self.sync.degraded)

    async def aclose(self) -> None:
        """Drain: NOT_SERVING → leave the cluster → finish in-flight calls → close clients.
        Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self.server.health.enter_graceful_shutdown()
        await self.heartbeat.aclose()
        await self.server.drain()
        await self._tasks.aclose()
        await self.sync.aclose()
        await self.dataplane.aclose()
        await self.pool.aclose()
        await self.store.aclose()
