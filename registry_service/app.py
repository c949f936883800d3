"""The registry's composition root: settings -> stores -> core -> servicer -> server, and the
way back down in the drain order every service follows."""

from __future__ import annotations

import logging
import time

import grpc

from modelyard import __version__
from modelyard.access import AccessControl, DeniedCall
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.errors import CoordinationUnavailable
from modelyard.membership import Heartbeat, new_service_id
from modelyard.model_signatures import SignaturePolicy
from modelyard.rpc.context import current_request_id
from modelyard.rpc.server import ServiceServer, create_server
from modelyard.tasks import BackgroundTasks
from modelyard.tls import ClientTLS
from modelyard.v1 import access_service_pb2_grpc, registry_service_pb2_grpc
from registry_service.access_servicer import ACCESS_SERVICE_NAME, AccessServicer
from registry_service.api_keys import ApiKeys, KeyStore
from registry_service.artifacts import ArtifactStore
from registry_service.db import Database
from registry_service.proof import ModelServerProver
from registry_service.records import AuditRecord
from registry_service.registry import Registry
from registry_service.servicer import SERVICE_NAME, RegistryServicer
from registry_service.settings import RegistrySettings

__all__ = ["RegistryApp"]

log = logging.getLogger(__name__)


class RegistryApp:
    """The registry service in one object.

    Usage::

        app = RegistryApp(load_settings(RegistrySettings, data_dir=path))
        await app.start()      # serving on app.address
        ...
        await app.aclose()     # drains, then closes the database and Redis

    `aclose()` is safe after a failed or partial `start()`, and safe to call twice.
    """

    name = "registry"

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.service_id = settings.service_id or new_service_id("registry")
        self._coordination: CoordinationStore | None = None
        self._db: Database | None = None
        self._key_store: KeyStore | None = None
        self.keys: ApiKeys | None = None
        self._registry: Registry | None = None
        self._server: ServiceServer | None = None
        self._heartbeat: Heartbeat | None = None
        self._tasks = BackgroundTasks()
        self._started = False
        self._start_time = 0.0

    @property
    def registry(self) -> Registry:
        """The core (for in-process callers such as the CLI's local mode)."""
        if self._registry is None:
            raise RuntimeError("Cannot use a RegistryApp before start().")
        return self._registry

    @property
    def port(self) -> int:
        """The bound gRPC port (the real one when the settings asked for 0)."""
        if self._server is None:
            raise RuntimeError("Cannot read the port of a RegistryApp before start().")
        return self._server.port

    @property
    def address(self) -> str:
        """host:port other processes dial."""
        if self._server is None:
            raise RuntimeError("Cannot read the address of a RegistryApp before start().")
        return self._server.address

    async def start(self) -> None:
        """Open the database, the artifact directory and Redis, start serving, publish the
        aliases, join the cluster, and report SERVING.

        Redis being down does not stop the registry: uploads and downloads do not need it,
        and the resync loop publishes the aliases once it is back.
        """
        if self._started:
            raise RuntimeError("Cannot start a RegistryApp more than once.")
        self._started = True
        self._start_time = time.time()
        settings = self.settings
        self._coordination = await CoordinationStore(settings.redis).open()
        self._db = await Database(settings.resolved_database_path).open()
        artifacts = ArtifactStore(settings.resolved_artifacts_dir)
        await artifacts.open()
        access = AccessControl(settings.access, kind="registry", on_denied=self._audit_denied)
        # The proof of a deployment change calls a model server as service:registry, with the
        # cluster's client TLS (the model servers' CALLERS admit the registry's certificate).
        prover = ModelServerProver(
            self._coordination.list_services,
            ClientTLS.from_settings(settings.tls),
            access.service_token(),
            timeout_s=settings.proof_timeout_s,
        )
        registry = self._registry = Registry(
            self._db,
            artifacts,
            self._coordination,
            max_artifact_bytes=settings.max_artifact_bytes,
            download_chunk_bytes=settings.download_chunk_bytes,
            retention_s=settings.retention_s,
            promote_timeout_s=settings.promote_timeout_s,
            signatures=SignaturePolicy.from_settings(settings.signing),
            prover=prover,
        )
        self._key_store = await KeyStore(settings.data_dir / "keys.sqlite3").open()
        keys = self.keys = ApiKeys(self._key_store, self._coordination, access.book)
        await keys.load()
        servicer = RegistryServicer(registry)
        access_servicer = AccessServicer(keys, registry)

        def register(server: grpc.aio.Server) -> None:
            registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
            access_service_pb2_grpc.add_AccessServiceServicer_to_server(access_servicer, server)

        self._server = create_server(
            settings.server,
            settings.tls,
            service_names=[SERVICE_NAME, ACCESS_SERVICE_NAME],
            kind="registry",
            register=register,
            access=access,
        )
        if access.enforced:
            admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
            await keys.bootstrap_admin(
                token=admin_key, write_to=None if admin_key else settings.resolved_admin_key_file
            )
        await self._server.start()
        if not await keys.publish():
            log.warning("Redis is unreachable; the API keys will be published when it is back")
        try:
            rewritten = await registry.sync_to_redis()
            if rewritten:
                log.info("published the aliases and deployments of %d model(s) to Redis", rewritten)
        except CoordinationUnavailable as exc:
            log.warning("Redis is unreachable; aliases will be published when it is back: %s", exc)
        self._heartbeat = Heartbeat(
            self._coordination,
            self._record,
            interval_s=settings.server.heartbeat_interval_s,
            ttl_s=settings.server.heartbeat_ttl_s,
        )
        await self._heartbeat.start()
        interval_s = settings.redis_resync_interval_s
        self._tasks.spawn("registry-redis-resync", lambda: registry.resync_forever(interval_s))
        self._tasks.spawn("registry-retention", registry.expire_holds_forever)
        self._tasks.spawn("registry-keys-resync", lambda: keys.resync_forever(min(interval_s, 1.0)))
        await self._server.set_serving(True)
        log.info("registry %s serving on %s", self.service_id, self._server.address)

    async def aclose(self) -> None:
        """Drain: NOT_SERVING, leave the cluster, stop the loops, let in-flight calls finish
        (up to `server.drain_grace_s`), then close the database and Redis."""
        if self._server is not None:
            await self._server.set_serving(False)
        if self._heartbeat is not None:
            await self._heartbeat.aclose()
            self._heartbeat = None
        await self._tasks.aclose()
        if self._server is not None:
            await self._server.drain()
            self._server = None
        if self._db is not None:
            await self._db.aclose()
        if self._key_store is not None:
            await self._key_store.aclose()
        if self._coordination is not None:
            await self._coordination.aclose()

    async def _audit_denied(self, call: DeniedCall) -> None:
        """Refused calls to mutating RPCs go to the audit log too."""
        if self._registry is None:
            return
        await self._registry.record_audit(
            AuditRecord(
                time=time.time(),
                actor=call.actor,
                method=call.method,
                model=call.model,
                target="",
                request_id=current_request_id(),
                outcome=call.code,
                error_reason=call.code,
                message=call.message,
            )
        )

    def _record(self) -> ServiceRecord:
        assert self._server is not None
        return ServiceRecord(
            id=self.service_id,
            kind="registry",
            address=self._server.address,
            metrics_address=self._server.metrics_address,
            metrics_scheme=self._server.metrics_scheme,
            software_version=__version__,
            start_time=self._start_time,
        )
