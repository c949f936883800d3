"""The server factory every service uses: grpc.aio with health, reflection, the observability
interceptor, Prometheus /metrics, optional TLS, and a drain in a fixed order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from modelyard import tls as tls_credentials
from modelyard.access import AccessControl, check_listen_address
from modelyard.rpc import keepalive
from modelyard.rpc.interceptors import ObservabilityInterceptor
from modelyard.settings import AccessSettings, ServerSettings, TLSSettings
from modelyard.telemetry import MetricsHTTPServer

__all__ = ["ServiceServer", "create_server", "channel_options", "server_credentials"]

log = logging.getLogger(__name__)

_OFF = AccessSettings(mode="off")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Message size limits shared by servers and client channels (keepalive is set by
    `modelyard.rpc.keepalive`: `open_channel` adds the client side, `create_server` the server's)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def server_credentials(tls: TLSSettings, *, kind: str = "") -> grpc.ServerCredentials | None:
    """TLS (or mTLS) credentials for a listener, reloaded when the files change, or None for
    plaintext (see `modelyard.tls.server_credentials`)."""
    return tls_credentials.server_credentials(tls, kind=kind)


class ServiceServer:
    """A started-or-not gRPC server with its health servicer and metrics endpoint.

    Usage::

        srv = create_server(settings.server, settings.tls, service_names=[...], register=...)
        await srv.start()          # binds; srv.port is the real port (0 picks one)
        await srv.set_serving(True)
        ...
        await srv.drain(grace_s=10)
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health: HealthServicer,
        service_names: Sequence[str],
        settings: ServerSettings,
        tls: TLSSettings | None = None,
        access: AccessControl | None = None,
    ) -> None:
        self.server = server
        self._access = access
        self._tls = tls or TLSSettings()
        self.port = port
        self.health = health
        self.service_names = list(service_names)
        self._settings = settings
        self.metrics: MetricsHTTPServer | None = None

    @property
    def address(self) -> str:
        """host:port other processes dial to reach this server."""
        host = self._settings.advertise_host or self._settings.host
        if host in ("0.0.0.0", "[::]", "::", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    @property
    def metrics_address(self) -> str:
        return f"{self.address.rsplit(':', 1)[0]}:{self.metrics.port}" if self.metrics else ""

    @property
    def metrics_scheme(self) -> str:
        """The scheme of /metrics: "https" when served with the service's certificate, else "http"."""
        return "https" if self._tls.enabled else "http"

    async def start(self) -> None:
        """Start serving and the /metrics endpoint; every service reports NOT_SERVING until
        `set_serving(True)`."""
        await self.server.start()
        metrics_port = self._settings.metrics_port
        if metrics_port is None:
            metrics_port = self.port + 1000 if self._settings.port else 0
        self.metrics = MetricsHTTPServer(
            self._settings.host.strip("[]") or "0.0.0.0",
            metrics_port,
            tls=self._tls,
            authorize=self._access.metrics_authorizer() if self._access is not None else None,
        )

    async def set_serving(self, serving: bool) -> None:
        """Report the whole server (and each of its services) as serving or not."""
        status = SERVING if serving else NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def drain(self, grace_s: float | None = None, *, settle_s: float = 0.0) -> None:
        """Stop taking calls, let in-flight ones finish within the grace period, then stop.

        Health goes NOT_SERVING first (for good), so load balancers move away before the
        listener closes.

        Args:
            grace_s: How long accepted calls may take to finish; unset: the settings'.
            settle_s: Wait this long after NOT_SERVING before stopping the listener, so calls
                already on their way reach a handler (`server.stop()` cancels those that
                reached the listener but not a handler yet).
        """
        await self.health.enter_graceful_shutdown()
        if settle_s > 0:
            await asyncio.sleep(settle_s)
        await self.server.stop(self._settings.drain_grace_s if grace_s is None else grace_s)
        if self.metrics is not None:
            # shutdown() waits out the HTTP server's 0.5 s poll: not on the event loop.
            await asyncio.to_thread(self.metrics.close)
            self.metrics = None


def create_server(
    settings: ServerSettings,
    tls: TLSSettings,
    *,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    kind: str = "",
    access: AccessControl | None = None,
) -> ServiceServer:
    """Build a server and bind its port, without starting it.

    Args:
        settings: Listener settings; port 0 binds a free port (see `ServiceServer.port`).
        tls: TLS settings; plaintext unless enabled.
        service_names: Full names of the services `register` adds (for health and reflection).
        register: Adds the servicers to the server.
        interceptors: Extra interceptors, run after the observability one (auth goes here).
        kind: The service kind (`gateway`, `model_server`, ...): under mTLS, calls are let
            through only from the peer kinds `modelyard.tls.CALLERS[kind]` allows.
        access: The service's access check (`modelyard.access`); None: nobody is checked,
            allowed only on a loopback address.

    Raises:
        RuntimeError: the port cannot be bound, or access control is off on an address
            other services can reach (unless `access.mode` says `insecure`).
    """
    if access is None or not access.enforced:
        off = access.settings if access is not None else _OFF
        check_listen_address(off, settings.host, kind or "a service")
    peer_check: list[grpc.aio.ServerInterceptor] = []
    if tls.enabled and tls.client_auth_required and kind in tls_credentials.CALLERS:
        peer_check.append(tls_credentials.PeerKindInterceptor(tls_credentials.CALLERS[kind]))
    server = grpc.aio.server(
        interceptors=[
            ObservabilityInterceptor(
                access_log_enabled=settings.access_log_enabled,
                access=access.screen() if access is not None else None,
            ),
            *peer_check,
            *interceptors,
        ],
        options=[
            *channel_options(settings.max_message_bytes),
            *keepalive.server_options(),
            # Without this, a second server on a taken port binds silently on Linux.
            ("grpc.so_reuseport", 0),
        ],
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(tls, kind=kind)
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {address}: {exc}") from exc
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}: the address is taken or invalid")
    return ServiceServer(server, port, health, service_names, settings, tls, access)
