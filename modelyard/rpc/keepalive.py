"""gRPC keepalive, client pings and the servers' ping policy, set in this one place.

Every channel of the cluster (`modelyard.tls.open_channel`, `open_sync_channel`) pings an idle
connection every `keepalive_time_ms()`, calls or not, and every server
(`modelyard.rpc.server.create_server`) accepts pings that often. gRPC servers otherwise accept
a ping without data only every 5 minutes and answer the third early one with GOAWAY
ENHANCE_YOUR_CALM "too_many_pings", which fails the calls racing it and makes the client
double its ping interval.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KEEPALIVE_TIME_ENV",
    "KEEPALIVE_TIME_MS",
    "KEEPALIVE_TIMEOUT_MS",
    "client_options",
    "keepalive_time_ms",
    "server_options",
]

KEEPALIVE_TIME_MS = 30_000
"""How often a channel pings its connection when nothing else is sent."""
KEEPALIVE_TIMEOUT_MS = 10_000
"""How long a ping may go unanswered before the connection is closed."""
KEEPALIVE_TIME_ENV = "MODELYARD_GRPC_KEEPALIVE_TIME_MS"
"""Overrides `KEEPALIVE_TIME_MS` for every client and server of a process (tests shorten it)."""


def keepalive_time_ms(environ: Mapping[str, str] = os.environ) -> int:
    """The ping interval: `KEEPALIVE_TIME_ENV` if set, else `KEEPALIVE_TIME_MS`.

    Raises:
        ValueError: the variable is set to something other than a positive integer.
    """
    raw = environ.get(KEEPALIVE_TIME_ENV, "").strip()
    if not raw:
        return KEEPALIVE_TIME_MS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(
            f"Environment variable `{KEEPALIVE_TIME_ENV}` value `{raw}` is not a positive integer"
        )
    return value


def client_options(environ: Mapping[str, str] = os.environ) -> list[tuple[str, Any]]:
    """Channel arguments for a client: ping every `keepalive_time_ms()`, idle or busy."""
    return [
        ("grpc.keepalive_time_ms", keepalive_time_ms(environ)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # No cap on pings between data frames: an idle channel keeps pinging.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(environ: Mapping[str, str] = os.environ) -> list[tuple[str, Any]]:
    """Server arguments: the same pings towards clients, and a ping policy that accepts what
    `client_options` sends.

    The server accepts pings twice as often as clients send them, so that timer jitter never
    counts as a strike; beyond that, the default of 2 strikes still guards against floods.
    """
    time_ms = keepalive_time_ms(environ)
    return [
        *client_options(environ),
        # With permit_without_calls the policy applies to idle connections too (otherwise a
        # connection without calls may ping only every 2 hours).
        ("grpc.http2.min_ping_interval_without_data_ms", time_ms // 2),
    ]
