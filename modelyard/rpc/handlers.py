"""Rebuilding a gRPC method handler around its behaviour: the one dispatch on the handler's
kind (unary or streaming, each way) that every server interceptor of the kernel needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import grpc

__all__ = ["Handler", "behavior_of", "factory_of"]

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def behavior_of(handler: Handler) -> Any:
    """The handler's behaviour: whichever of its four slots is set. grpc.aio handlers hold
    coroutine (or async generator) functions, not the sync callables the stubs describe, so
    it is typed as Any."""
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def factory_of(handler: Handler) -> Callable[..., Handler]:
    """The grpc factory that builds a handler of the same kind as `handler` (call it with the
    new behaviour and the serializers)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler
    return grpc.stream_stream_rpc_method_handler
