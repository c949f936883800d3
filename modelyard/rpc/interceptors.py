"""Server interceptors: request id, RPC metrics and access log, in one pass per call.

One interceptor instead of three, and the wrapped handler is cached per method: building
method handlers per call would cost more than everything else here on the Predict path.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from modelyard.rpc.context import REQUEST_ID_METADATA_KEY, new_request_id, request_id_var
from modelyard.telemetry import RPC_HANDLED, RPC_SECONDS

__all__ = ["ObservabilityInterceptor"]

access_log = logging.getLogger("modelyard.access")

# A string: grpc.RpcMethodHandler is generic only in the stubs, not at runtime.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


def _request_id_from(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return new_request_id()


class _MethodObserver:
    """Bound metric children and names for one method, built once."""

    def __init__(self, method: str, access_log_enabled: bool) -> None:
        _, _, path = method.partition("/")
        self.service, _, self.method = path.partition("/")
        self.full = method
        self.seconds = RPC_SECONDS.labels(self.service, self.method)
        self._handled: dict[str, Any] = {}
        self.access_log_enabled = access_log_enabled

    def done(self, context: grpc.aio.ServicerContext[Any, Any], start: float, failed: bool) -> None:
        elapsed = time.perf_counter() - start
        code = context.code()
        if code is None:
            name = "UNKNOWN" if failed else "OK"
        elif isinstance(code, grpc.StatusCode):
            name = code.name
        else:  # an int set through set_code
            name = grpc.StatusCode(code).name if code in grpc.StatusCode else str(code)
        counter = self._handled.get(name)
        if counter is None:
            counter = self._handled[name] = RPC_HANDLED.labels(self.service, self.method, name)
        counter.inc()
        self.seconds.observe(elapsed)
        if self.access_log_enabled:
            access_log.info(
                "%s %s %.3fms request_id=%s peer=%s",
                self.full,
                name,
                elapsed * 1000,
                request_id_var.get(),
                context.peer(),
            )


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id context variable, counts and times every RPC, logs it if asked."""

    def __init__(self, *, access_log_enabled: bool = False) -> None:
        self._access_log_enabled = access_log_enabled
        self._cache: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, _MethodObserver(method, self._access_log_enabled))
        self._cache[method] = (handler, wrapped)
        return wrapped

    @staticmethod
    def _wrap(handler: _Handler, observer: _MethodObserver) -> _Handler:
        # grpc.aio handlers hold coroutine (or async generator) functions, not the sync callables
        # the stubs describe, so the behaviour is typed as Any.
        behavior: Any
        factory: Callable[..., _Handler]
        if handler.unary_unary is not None:
            behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler
        elif handler.unary_stream is not None:
            behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
        elif handler.stream_unary is not None:
            behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
        else:
            behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler

        if inspect.isasyncgenfunction(behavior):

            async def observed_stream(request: Any, context: Any) -> Any:
                request_id_var.set(_request_id_from(context))
                start = time.perf_counter()
                failed = True
                try:
                    async for item in behavior(request, context):
                        yield item
                    failed = False
                finally:
                    observer.done(context, start, failed)

            wrapped: Any = observed_stream
        else:

            async def observed(request: Any, context: Any) -> Any:
                # Each RPC runs in its own task with a copy of the context, so setting the
                # variable here never leaks into another call.
                request_id_var.set(_request_id_from(context))
                start = time.perf_counter()
                failed = True
                try:
                    result = await behavior(request, context)
                    failed = False
                    return result
                finally:
                    observer.done(context, start, failed)

            wrapped = observed

        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
