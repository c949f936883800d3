"""The monitor's composition root."""

from __future__ import annotations

from modelyard import __version__
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.membership import Heartbeat, new_service_id
from modelyard.rpc.server import ServiceServer, create_server
from modelyard.v1 import monitor_service_pb2_grpc
from monitor_service.cluster import ClusterView
from monitor_service.servicer import MonitorServicer
from monitor_service.settings import MonitorSettings

__all__ = ["MonitorApp"]

SERVICE_NAME = "modelyard.v1.MonitorService"


class MonitorApp:
    """A monitor process: `await start()`, serve, `await aclose()`."""

    name = "monitor"

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.service_id = settings.service_id or new_service_id("monitor")
        self.store = CoordinationStore(settings.redis)
        self.cluster = ClusterView(self.store, settings.down_retention_s)
        servicer = MonitorServicer(self.cluster)
        self.server: ServiceServer = create_server(
            settings.server,
            settings.tls,
            service_names=[SERVICE_NAME],
            register=lambda s: monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, s),
        )
        self.heartbeat = Heartbeat(
            self.store,
            lambda: ServiceRecord(
                id=self.service_id,
                kind="monitor",
                address=self.server.address,
                metrics_address=self.server.metrics_address,
                software_version=__version__,
                start_time=self.heartbeat.start_time,
            ),
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

    async def start(self) -> None:
        await self.store.open()
        await self.server.start()
        await self.heartbeat.start()
        await self.server.set_serving(True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.server.health.enter_graceful_shutdown()
        await self.heartbeat.aclose()
        await self.server.drain()
        await self.store.aclose()
