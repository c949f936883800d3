"""One table from domain errors to gRPC status, and the `@rpc_errors` decorator every RPC wears.

Errors leave a server as a `google.rpc.Status` (message and details bounded in length, so
no caller-chosen name is ever echoed whole) with `ErrorInfo(reason, domain)`, plus
`BadRequest` naming the field at fault or `RetryInfo` for overload. An unexpected exception
becomes INTERNAL with a generic message and the request id to quote; its trace goes only to
the log. A failure relayed from an upstream server (the gateway calling a model server) keeps
its code, message and details unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from modelyard import errors
from modelyard.rpc.context import current_request_id

__all__ = ["DOMAIN", "STATUS_BY_ERROR", "status_code_for", "to_rpc_status", "rpc_errors"]

log = logging.getLogger(__name__)

DOMAIN = "modelyard.dev"

STATUS_BY_ERROR: dict[type[errors.ModelyardError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ArtifactCorrupt: grpc.StatusCode.DATA_LOSS,
    errors.ModelExecutionError: grpc.StatusCode.INTERNAL,
}


def status_code_for(error: errors.ModelyardError) -> grpc.StatusCode:
    """The status of an error: its most specific class in the table wins."""
    for cls in type(error).__mro__:
        code = STATUS_BY_ERROR.get(cls)  # the MRO holds non-error types too: they miss
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


MAX_MESSAGE_CHARS = 1024
"""Most characters of a status message (it travels in metadata, which clients bound)."""

MAX_DETAIL_CHARS = 256
"""Most characters of a field path or an ErrorInfo metadata value."""


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_rpc_status(error: errors.ModelyardError) -> grpc.Status:
    """Build the rich status (with ErrorInfo, BadRequest, RetryInfo) for a domain error."""
    code = status_code_for(error)
    message = _bounded(error.message, MAX_MESSAGE_CHARS)
    metadata = {
        _bounded(key, MAX_DETAIL_CHARS): _bounded(value, MAX_DETAIL_CHARS)
        for key, value in error.metadata.items()
    }
    request_id = current_request_id()
    if request_id:
        metadata.setdefault("request_id", request_id)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata))]
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(status)


def _internal_status() -> grpc.Status:
    request_id = current_request_id() or "-"
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error; quote request id {request_id} when reporting it",
        details=[
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="INTERNAL", domain=DOMAIN, metadata={"request_id": request_id}
                )
            )
        ],
    )
    return rpc_status.to_status(status)


async def _abort_for(exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(exc, errors.ModelyardError):
        await context.abort_with_status(to_rpc_status(exc))
    if isinstance(exc, grpc.aio.AioRpcError):
        # Relay an upstream failure as it is: its code, message and rich details.
        await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
    log.exception("unexpected error (request id %s)", current_request_id() or "-")
    await context.abort_with_status(_internal_status())


F = TypeVar("F", bound=Callable[..., Any])


def rpc_errors(method: F) -> F:
    """Own the exception-to-status step of an RPC method (unary or server-streaming).

    Usage::

        class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
            @rpc_errors
            async def GetModel(self, request, context): ...
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the one place that maps them all
                await _abort_for(exc, context)

        stream_wrapper.__rpc_errors__ = True  # type: ignore[attr-defined]  # marker for the test
        return cast(F, stream_wrapper)

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the one place that maps them all
            await _abort_for(exc, context)

    unary_wrapper.__rpc_errors__ = True  # type: ignore[attr-defined]  # marker for the test
    return cast(F, unary_wrapper)
