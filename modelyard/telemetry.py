"""Prometheus metrics over HTTP, logging set-up, and the RPC metrics every server exports.

Metrics are module-level (the Prometheus convention): several servers in one process, as in
the tests, share them and are told apart by their labels.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Histogram, start_http_server

from modelyard.settings import TLSSettings
from modelyard.tls import HTTPSReloader

__all__ = [
    "RPC_HANDLED",
    "RPC_SECONDS",
    "LATENCY_BUCKETS_S",
    "FINE_LATENCY_BUCKETS_S",
    "MetricsHTTPServer",
    "configure_logging",
]

# From 0.25 ms to 10 s: the Predict path lives in the first half of this range.
LATENCY_BUCKETS_S = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Geometric, factor 1.125 from 0.25 ms to ~15 s: percentiles interpolated from bucket deltas
# stay within a few per cent of the true ones (the monitor's p50/p95/p99 come from these).
FINE_LATENCY_BUCKETS_S = tuple(round(0.00025 * 1.125**i, 7) for i in range(94))

RPC_HANDLED = Counter(
    "modelyard_rpc_server_handled",
    "RPCs completed by the server, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_SECONDS = Histogram(
    "modelyard_rpc_server_handling_seconds",
    "Time from receiving an RPC to its completion, as the server sees it.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS_S,
)


class MetricsHTTPServer:
    """Prometheus `/metrics` on its own port, served from a daemon thread; HTTPS with the
    service's certificate when its TLS is on (client certificates required under mTLS).

    Args:
        authorize: Given the request's `Authorization` header (None without one), whether to
            answer; a refused request gets 401. None: open to every caller.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: TLSSettings | None = None,
        authorize: Callable[[str | None], bool] | None = None,
    ) -> None:
        self._httpd: WSGIServer
        if tls is not None and tls.enabled:
            self._httpd, self._thread = start_http_server(
                port,
                addr=host,
                certfile=str(tls.cert_file),
                keyfile=str(tls.key_file),
                client_cafile=str(tls.ca_file) if tls.ca_file else None,
                client_auth_required=tls.client_auth_required,
            )
            # Rotated files are served from the next handshake on, as on the gRPC port.
            listener = self._httpd.socket
            assert isinstance(listener, ssl.SSLSocket)
            listener.context.sni_callback = HTTPSReloader(tls).sni_callback
        else:
            self._httpd, self._thread = start_http_server(port, addr=host)
        if authorize is not None:
            # Before the service registers or reports SERVING: nobody scrapes it yet.
            self._httpd.set_app(_guarded(self._httpd.get_app(), authorize))
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _guarded(app: Any, authorize: Callable[[str | None], bool]) -> Any:
    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not authorize(environ.get("HTTP_AUTHORIZATION")):
            start_response(
                "401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")]
            )
            return [b"/metrics needs 'Authorization: Bearer <service token or key with monitor.read>'\n"]
        return app(environ, start_response)

    return guarded


def configure_logging(level: str | None = None) -> None:
    """Plain, one-line logs to stderr; the level from MODELYARD_LOG_LEVEL (default INFO)."""
    logging.basicConfig(
        level=(level or os.environ.get("MODELYARD_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
