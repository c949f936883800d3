"""Calls to model servers over pooled channels, carrying bytes, not decoded messages.

A PredictRequest's bytes followed by field 2 (version) are a valid InferRequest, and an
InferResponse's bytes are a valid PredictResponse (see the protos), so the gateway forwards
tensors without decoding or re-encoding them.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import warnings
from typing import Any

import grpc

from modelyard.rpc.context import REQUEST_ID_METADATA_KEY
from modelyard.rpc.server import channel_options
from modelyard.tls import ClientTLS, ClientTLSWatch, open_channel

log = logging.getLogger(__name__)

__all__ = ["ChannelPool", "ReplicaUnavailable", "append_version"]

INFER_METHOD = "/modelyard.v1.ModelServerService/Infer"

_VERSION_TAG = b"\x10"  # field 2, wire type varint


def append_version(request: bytes, version: int) -> bytes:
    """Turn PredictRequest bytes into InferRequest bytes for `version` (last field wins)."""
    out = bytearray(request)
    out += _VERSION_TAG
    value = version
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SAFE_REASONS = (b"VERSION_NOT_READY", b"DRAINING", b"NO_READY_REPLICA")


def refused_before_work(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call certainly did no work, so another replica may take it.

    True for a model server's own refusal (not ready / draining, carried in ErrorInfo; or
    NOT_FOUND: it no longer holds the model, unloaded since its heartbeat said it did) and for
    a connection that was never made. A connection lost mid-call is not retried: the batch
    may have run.
    """
    code = exc.code()
    if code is grpc.StatusCode.NOT_FOUND:
        return _has_reason(exc, (b"MODEL_NOT_FOUND",))
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        # The model server refused the gateway itself (not the caller, whose key the gateway
        # already checked): a cluster secret that differs. Never relayed as the caller's fault.
        _log_refused_gateway(exc)
        return True
    if code is not grpc.StatusCode.UNAVAILABLE:
        return False
    if _has_reason(exc, _SAFE_REASONS):
        return True
    text = f"{exc.details()} {exc.debug_error_string()}".lower()
    return "failed to connect" in text or "connection refused" in text or "no route" in text


_last_refusal_log = 0.0


def _log_refused_gateway(exc: grpc.aio.AioRpcError) -> None:
    global _last_refusal_log
    now = time.monotonic()
    if now - _last_refusal_log > 10.0:
        _last_refusal_log = now
        log.error(
            "a model server refused the gateway's credentials (%s: %s); every service must be given"
            " the same cluster secret (ACCESS__SERVICE_SECRET_FILE)",
            exc.code().name,
            (exc.details() or "")[:200],
        )


def _has_reason(exc: grpc.aio.AioRpcError, reasons: tuple[bytes, ...]) -> bool:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return any(reason in value for reason in reasons)
    return False


class ReplicaUnavailable(Exception):
    """The replica refused or could not take the call before doing any work."""

    def __init__(self, upstream: grpc.aio.AioRpcError) -> None:
        super().__init__(upstream.details())
        self.upstream = upstream


class _State(enum.Enum):
    OPENED = 1
    CLOSED = 2


class _Entry:
    """One channel, its Infer callable, and the calls in flight on it."""

    __slots__ = ("channel", "infer", "in_flight", "retired", "closed")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        # No serializers: bytes in, bytes out.
        self.infer: Any = channel.unary_unary(INFER_METHOD)
        self.in_flight = 0
        self.retired = False
        self.closed = False


class ChannelPool:
    """One long-lived channel per model server address (TLS with `tls`, else plaintext).

    A server that leaves the cluster is `forget`-ten: new calls no longer use its channel, and
    the channel closes once the calls already on it have ended (or `retire_grace_s` after it
    was forgotten, whichever comes first): closing it at once would cancel those calls, whose
    callers would then see no real status.

    With TLS, every channel is retired the same way when the certificate files change
    (checked every `tls_check_interval_s`): new calls go on new channels.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int,
        tls: ClientTLS | None = None,
        tls_check_interval_s: float = 5.0,
        retire_grace_s: float = 60.0,
        call_metadata: tuple[tuple[str, str], ...] = (),
    ):
        self._options = channel_options(max_message_bytes)
        self._call_metadata = call_metadata
        """The gateway's own credentials (its service token), sent with every call."""
        self._tls = tls
        self._watch = ClientTLSWatch(tls, interval_s=tls_check_interval_s) if tls is not None else None
        self._generation = 0
        self._retire_grace_s = retire_grace_s
        self._channels: dict[str, _Entry] = {}
        self._retiring: set[_Entry] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self._state = _State.OPENED

    def _entry(self, address: str) -> _Entry:
        if self._watch is not None and self._watch.generation() != self._generation:
            self._generation = self._watch.generation()
            for old in list(self._channels):  # the certificates rotated: new channels
                self._retire(old)
        entry = self._channels.get(address)
        if entry is None:
            if self._state is _State.CLOSED:
                raise RuntimeError("Cannot send a request, as the channel pool has been closed.")
            channel = open_channel(address, self._tls, options=self._options)
            entry = self._channels[address] = _Entry(channel)
        return entry

    def in_flight(self, address: str) -> int:
        """Calls in flight to `address` on its current channel."""
        entry = self._channels.get(address)
        return entry.in_flight if entry is not None else 0

    async def infer(self, address: str, request: bytes, timeout_s: float, request_id: str) -> bytes:
        """Send InferRequest bytes; return InferResponse bytes.

        Raises:
            ReplicaUnavailable: the replica is down, draining, or does not hold the version:
                safe to retry on another replica.
            grpc.aio.AioRpcError: any other failure, to relay to the caller as it is.
        """
        entry = self._entry(address)
        entry.in_flight += 1
        try:
            response: bytes = await entry.infer(
                request,
                timeout=timeout_s,
                metadata=((REQUEST_ID_METADATA_KEY, request_id), *self._call_metadata),
            )
        except grpc.aio.AioRpcError as exc:
            if refused_before_work(exc):
                raise ReplicaUnavailable(exc) from exc
            raise
        finally:
            entry.in_flight -= 1
            if entry.retired and not entry.in_flight:
                self._close(entry)
        return response

    async def call(
        self, address: str, method: str, request: bytes, timeout_s: float, request_id: str
    ) -> bytes:
        """A unary call of any method on a model server, bytes in and bytes out (the rare
        calls beside Infer: OIP ModelConfig and ModelStatistics)."""
        entry = self._entry(address)
        callable_: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = entry.channel.unary_unary(method)
        entry.in_flight += 1
        try:
            response: bytes = await callable_(
                request,
                timeout=timeout_s,
                metadata=((REQUEST_ID_METADATA_KEY, request_id), *self._call_metadata),
            )
        finally:
            entry.in_flight -= 1
            if entry.retired and not entry.in_flight:
                self._close(entry)
        return response

    async def forget(self, address: str) -> None:
        """A server left the cluster: new calls to `address` get a new channel, and the old
        one closes once its calls in flight have ended (at the latest `retire_grace_s` on)."""
        self._retire(address)

    def _retire(self, address: str) -> None:
        entry = self._channels.pop(address, None)
        if entry is None:
            return
        entry.retired = True
        if not entry.in_flight:
            self._close(entry)
            return
        self._retiring.add(entry)
        asyncio.get_running_loop().call_later(self._retire_grace_s, self._close, entry)

    def _close(self, entry: _Entry) -> None:
        """Close a forgotten channel (once: its last call and its grace timer both ask)."""
        if entry.closed:
            return
        entry.closed = True
        self._retiring.discard(entry)
        task = asyncio.get_running_loop().create_task(entry.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        self._state = _State.CLOSED
        entries = [*self._channels.values(), *self._retiring]
        self._channels.clear()
        self._retiring.clear()
        for entry in entries:
            entry.closed = True
        await asyncio.gather(*(e.channel.close() for e in entries), *self._closing, return_exceptions=True)

    def __del__(self) -> None:
        if getattr(self, "_channels", None):
            warnings.warn("Unclosed ChannelPool; call aclose()", ResourceWarning, stacklevel=1)
