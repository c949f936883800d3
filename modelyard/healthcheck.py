"""`python -m modelyard.healthcheck HOST:PORT [SERVICE]`: exit 0 when the server's
grpc.health.v1 says SERVING, 1 otherwise. For container health checks (Docker, compose).

Over TLS when `MODELYARD_TLS_CA_FILE` is set (with `MODELYARD_TLS_CERT_FILE` and
`MODELYARD_TLS_KEY_FILE` for a service that requires client certificates)."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.tls import ClientTLS, open_sync_channel


def check(address: str, service: str = "", timeout_s: float = 3.0, tls: ClientTLS | None = None) -> bool:
    """Whether `address` reports `service` ("" = the whole server) as SERVING."""
    with open_sync_channel(address, tls) as channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m modelyard.healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    address, service = argv[0], argv[1] if len(argv) == 2 else ""
    return 0 if check(address, service, tls=ClientTLS.from_env(os.environ)) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
