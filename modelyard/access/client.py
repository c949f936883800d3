"""Client side: attach a bearer token to every call of a channel.

Usage::

    channel = open_channel(address, client_tls, interceptors=bearer(token))

The gateway's hot path adds its token to the call's metadata itself (no interceptor layer);
every other client (model servers fetching artifacts, the monitor, the CLI, the load tests)
uses this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["bearer", "bearer_metadata"]


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The `authorization` metadata for `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _with(
    details: grpc.aio.ClientCallDetails, extra: tuple[tuple[str, str], ...]
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_with(details, self._extra), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], details: Any, request: Any
    ) -> Any:
        return await continuation(_with(details, self._extra), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(_with(details, self._extra), requests)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, extra: tuple[tuple[str, str], ...]) -> None:
        self._extra = extra

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], details: Any, requests: Any
    ) -> Any:
        return await continuation(_with(details, self._extra), requests)


def bearer(token: str | None) -> list[grpc.aio.ClientInterceptor] | None:
    """Interceptors that send `token` with every call (None without a token)."""
    extra = bearer_metadata(token)
    if not extra:
        return None
    return [_UnaryUnary(extra), _UnaryStream(extra), _StreamUnary(extra), _StreamStream(extra)]
