"""Server interceptors: access control, request id, RPC metrics and access log, in one pass
per call.

One interceptor instead of three, and the wrapped handler is cached per method: building
method handlers per call would cost more than everything else here on the Predict path.

It also owns the parsing of request messages for every RPC of every service: bytes that do
not parse as the method's request type are answered INVALID_ARGUMENT naming that type, in
place of grpc's UNKNOWN "Unexpected DecodeError", before any servicer code runs.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

if TYPE_CHECKING:
    from modelyard.access.interceptor import AccessScreen
from modelyard.rpc.context import REQUEST_ID_METADATA_KEY, new_request_id, request_id_var
from modelyard.rpc.handlers import behavior_of, factory_of
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

    def __init__(self, *, access_log_enabled: bool = False, access: AccessScreen | None = None) -> None:
        self._access_log_enabled = access_log_enabled
        self._access = access
        self._cache: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if self._access is not None:
            # Who is calling, and may they: before anything else (modelyard.access).
            handler = self._access.screen(handler, handler_call_details)
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
        behavior, factory = behavior_of(handler), factory_of(handler)

        deserializer = handler.request_deserializer
        if deserializer is not None:
            deserializer = _tolerant(deserializer)
            if handler.request_streaming:
                behavior = _refusing_undecodable_stream(behavior)
        # A unary request is checked in the observer itself: no extra layer per call.
        check_request = deserializer is not None and not handler.request_streaming

        if inspect.isasyncgenfunction(behavior):

            async def observed_stream(request: Any, context: Any) -> Any:
                request_id_var.set(_request_id_from(context))
                start = time.perf_counter()
                failed = True
                try:
                    if check_request and type(request) is _Undecodable:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.status_message())
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
                    if check_request and type(request) is _Undecodable:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.status_message())
                    result = await behavior(request, context)
                    failed = False
                    return result
                finally:
                    observer.done(context, start, failed)

            wrapped = observed

        return factory(
            wrapped,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )


class _Undecodable:
    """What a request deserializer yields for bytes that do not parse (instead of raising)."""

    __slots__ = ("message_type", "error")

    def __init__(self, message_type: str, error: Exception) -> None:
        self.message_type = message_type
        self.error = error

    def status_message(self) -> str:
        detail = str(self.error).splitlines()[0][:200] if str(self.error) else type(self.error).__name__
        return f"the request bytes do not parse as {self.message_type}: {detail}"


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "the method's request message"))


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    message_type = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, and others on odd bytes
            return _Undecodable(message_type, exc)

    return deserialize


def _refusing_undecodable_stream(behavior: Any) -> Any:
    """Wrap a request-streaming behaviour: the servicer reads the requests one by one, and an
    undecodable one ends the call with INVALID_ARGUMENT when it is reached."""

    async def checked_requests(requests: Any, context: Any) -> Any:
        async for item in requests:
            if type(item) is _Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.status_message())
            yield item

    if inspect.isasyncgenfunction(behavior):

        async def stream_in_stream_out(requests: Any, context: Any) -> Any:
            async for item in behavior(checked_requests(requests, context), context):
                yield item

        return stream_in_stream_out

    async def stream_in(requests: Any, context: Any) -> Any:
        return await behavior(checked_requests(requests, context), context)

    return stream_in
