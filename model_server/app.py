"""The model server's composition root: settings → Redis, registry client → repository,
reconciler → servicer → server.

gRPC objects (the server, the registry channel) are built in `start()`, on the running loop:
`run_service` builds the app before `asyncio.run`, and a grpc.aio object made outside the
loop that serves it fails with "attached to a different loop".
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from model_server.batching import BatchConfig
from model_server.dataplane import ModelServerDataPlane
from model_server.devices import available_devices
from model_server.loader import ArtifactSource, RegistryArtifactSource
from model_server.oip_servicer import OIP_SERVICE_NAME, OipServicer
from model_server.optimization import CompileCache, OptimizationReport, Optimizer
from model_server.reconciler import Backoff, Reconciler
from model_server.repository import ModelRepository, VersionState
from model_server.servicer import SERVICE_NAME, ModelServerServicer
from model_server.settings import ModelServerSettings, resolve_torch_threads
from model_server.stats import RequestStats
from modelyard import __version__
from modelyard.access import AccessControl
from modelyard.access.sync import KeySync
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.membership import Heartbeat, new_service_id
from modelyard.model_signatures import SignaturePolicy
from modelyard.oip import grpc_service_pb2_grpc
from modelyard.rpc.server import NOT_SERVING, SERVING, ServiceServer, create_server
from modelyard.tasks import BackgroundTasks
from modelyard.tls import ClientTLS
from modelyard.v1 import model_server_service_pb2_grpc

__all__ = ["ModelServerApp", "version_health_name"]

log = logging.getLogger(__name__)


def version_health_name(model: str, version: int) -> str:
    """The grpc.health.v1 service name of one held version: SERVING while it is ready."""
    return f"modelyard.model.{model}.{version}"


class ModelServerApp:
    """A model server process: `await start()`, serve, `await aclose()`.

    Args:
        settings: Everything from the environment.
        artifact_source: Where artifacts come from; unset means the registry at
            `settings.registry_address`.
    """

    name = "model_server"

    def __init__(
        self, settings: ModelServerSettings, *, artifact_source: ArtifactSource | None = None
    ) -> None:
        self.settings = settings
        # Process-wide; set once here, before any model runs.
        torch.set_num_threads(resolve_torch_threads(settings.torch_threads, settings.instances))
        self.service_id = settings.service_id or new_service_id("model_server")
        self._devices = available_devices()
        self.store = CoordinationStore(settings.redis)
        self._registry: RegistryArtifactSource | None = None
        # Every RPC here is internal; the keys are loaded all the same, so that an end user's
        # key is told PERMISSION_DENIED (internal) rather than not known.
        self.access = AccessControl(settings.access, kind="model_server")
        self.key_sync = KeySync(
            self.store, self.access.book, interval_s=settings.access.key_refresh_interval_s
        )
        if artifact_source is None:
            artifact_source = self._registry = RegistryArtifactSource(
                settings.registry_address,
                max_message_bytes=settings.server.max_message_bytes,
                tls=ClientTLS.from_settings(settings.tls),
                token=self.access.service_token(),
            )
        # One set of request figures for both protocols (the monitor sees every call); a
        # version's series go when it is unloaded.
        self.stats = RequestStats()
        self.repository = ModelRepository(
            artifact_source,
            BatchConfig(
                max_batch_size=settings.max_batch_size,
                max_queue_delay_s=settings.max_queue_delay_ms / 1000,
                max_queue_size=settings.max_queue_size,
                instances=settings.instances,
                preferred_batch_sizes=settings.preferred_batch_sizes,
                execution=settings.execution,
            ),
            device=settings.device,
            precision=settings.precision,
            on_change=self._held_changed,
            on_unloaded=self.stats.forget,
            signatures=SignaturePolicy.from_settings(settings.signing),
            optimizer=Optimizer(CompileCache(settings.compile_cache_dir)),
            report_sink=self._record_report if self._registry is not None else None,
        )
        self.reconciler = Reconciler(
            self.store,
            self.repository,
            interval_s=settings.reconcile_interval_s,
            backoff=Backoff(cap_s=settings.load_retry_max_s),
            server_id=self.service_id,
        )
        self.heartbeat = Heartbeat(
            self.store,
            self._record,
            interval_s=settings.server.heartbeat_interval_s,
            ttl_s=settings.server.heartbeat_ttl_s,
        )
        self._tasks = BackgroundTasks()
        self._health_dirty = asyncio.Event()
        self._health_names: set[str] = set()
        self._server: ServiceServer | None = None
        self._draining = False
        self._closed = False

    @property
    def server(self) -> ServiceServer:
        if self._server is None:
            raise RuntimeError("The model server has not been started.")
        return self._server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    def _record(self) -> ServiceRecord:
        return ServiceRecord(
            id=self.service_id,
            kind="model_server",
            address=self.server.address,
            metrics_address=self.server.metrics_address,
            metrics_scheme=self.server.metrics_scheme,
            software_version=__version__,
            start_time=self.heartbeat.start_time,
            draining=self._draining,
            versions=self.repository.records(),
            devices=self._devices,
        )

    async def _record_report(self, model: str, version: int, report: OptimizationReport) -> None:
        if self._registry is not None:
            await self._registry.record_reports(model, version, [report.to_proto(self.service_id)])

    def _held_changed(self) -> None:
        # Only meaningful once the heartbeat knows our address.
        if self._server is not None:
            self.heartbeat.poke()
            self._health_dirty.set()

    async def _follow_version_health(self) -> None:
        """Keep one grpc.health.v1 service per held version: SERVING while it is ready."""
        while True:
            await self._health_dirty.wait()
            self._health_dirty.clear()
            health = self.server.health
            current: dict[str, int] = {
                version_health_name(v.model, v.version): (
                    SERVING if v.state is VersionState.READY else NOT_SERVING
                )
                for v in self.repository.versions()
            }
            for name in self._health_names - current.keys():
                await health.set(name, NOT_SERVING)
            for name, status in current.items():
                await health.set(name, status)
            self._health_names = set(current)

    async def start(self) -> None:
        """Listen, join the cluster, and start following the aliases."""
        if self._server is not None or self._closed:
            raise RuntimeError("Cannot start a ModelServerApp more than once.")
        self.dataplane = ModelServerDataPlane(self.repository, self.stats)
        servicer = ModelServerServicer(
            self.dataplane, server_id=self.service_id, draining=lambda: self._draining
        )
        oip_servicer = OipServicer(self.dataplane, draining=lambda: self._draining)

        def register(server: grpc.aio.Server) -> None:
            model_server_service_pb2_grpc.add_ModelServerServiceServicer_to_server(servicer, server)
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(oip_servicer, server)

        self._server = create_server(
            self.settings.server,
            self.settings.tls,
            service_names=[SERVICE_NAME, OIP_SERVICE_NAME],
            register=register,
            kind="model_server",
            access=self.access,
        )
        await self.store.open()
        if self.access.enforced:
            await self.key_sync.refresh()
            self._tasks.spawn("key-sync", self.key_sync.run_forever)
        await self._server.start()
        await self.heartbeat.start()
        self._tasks.spawn("reconcile", self.reconciler.run)
        self._tasks.spawn("alias-events", self.reconciler.watch_events)
        self._tasks.spawn("version-health", self._follow_version_health)
        self._health_dirty.set()
        # The server itself is up; each version is ready when its heartbeat says so.
        await self._server.set_serving(True)

    async def aclose(self) -> None:
        """Drain: NOT_SERVING → stop following aliases and leave the cluster → settle →
        finish in-flight calls → drain the batchers → close the registry channel and Redis.

        The settle delay (`drain_settle_s`) sits between leaving the cluster and stopping the
        listener: gateways drop this server from routing on the "down" event, and calls they
        sent just before still reach a handler. `server.stop()` cancels calls that reached
        the listener but not yet a handler (the caller sees CANCELLED), so the listener must
        stop only once nothing new is on its way.

        Safe after a failed or partial `start()`, and safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._draining = True
        if self._server is not None:
            await self._server.health.enter_graceful_shutdown()
        await self._tasks.aclose()
        await self.reconciler.aclose()
        await self.heartbeat.aclose()
        if self._server is not None:
            await self._server.drain(settle_s=self.settings.drain_settle_s)
        await self.repository.aclose()
        if self._registry is not None:
            await self._registry.aclose()
        await self.store.aclose()
