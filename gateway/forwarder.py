"""Calls to model servers over pooled channels, carrying bytes, not decoded messages.

A PredictRequest's bytes followed by field 2 (version) are a valid InferRequest, and an
InferResponse's bytes are a valid PredictResponse (see the protos), so the gateway forwards
tensors without decoding or re-encoding them.
"""

from __future__ import annotations

import asyncio
import enum
import warnings
from typing import Any

import grpc

from modelyard.rpc.context import REQUEST_ID_METADATA_KEY
from modelyard.rpc.server import channel_options
from modelyard.tls import ClientTLS, ClientTLSWatch, open_channel

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

    True for a model server's own refusal (not ready / draining, carried in ErrorInfo) and
    for a connection that was never made. A connection lost mid-call is not retried: the
    batch may have run.
    """
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            return any(reason in value for reason in _SAFE_REASONS)
    text = f"{exc.details()} {exc.debug_error_string()}".lower()
    return "failed to connect" in text or "connection refused" in text or "no route" in text


class ReplicaUnavailable(Exception):
    """The replica refused or could not take the call before doing any work."""

    def __init__(self, upstream: grpc.aio.AioRpcError) -> None:
        super().__init__(upstream.details())
        self.upstream = upstream


class _State(enum.Enum):
    OPENED = 1
    CLOSED = 2


RETIRE_GRACE_S = 60.0
"""How long a channel replaced after a client certificate rotation keeps its in-flight calls."""


class ChannelPool:
    """One long-lived channel per model server address (TLS with `tls`, else plaintext).

    With TLS, the channels are opened again when the certificate files change (checked every
    `tls_check_interval_s`): new calls go on new channels, and the old ones are closed once
    their calls finished (at most `RETIRE_GRACE_S`).
    """

    def __init__(
        self, *, max_message_bytes: int, tls: ClientTLS | None = None, tls_check_interval_s: float = 5.0
    ):
        self._options = channel_options(max_message_bytes)
        self._tls = tls
        self._watch = ClientTLSWatch(tls, interval_s=tls_check_interval_s) if tls is not None else None
        self._generation = 0
        self._retiring: set[asyncio.Task[None]] = set()
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}
        self._state = _State.OPENED

    def _channel(self, address: str) -> grpc.aio.Channel:
        return self._entry(address)[0]

    def _infer_call(self, address: str) -> Any:
        return self._entry(address)[1]

    def _entry(self, address: str) -> tuple[grpc.aio.Channel, Any]:
        if self._watch is not None and self._watch.generation() != self._generation:
            self._retire_channels()
        entry = self._channels.get(address)
        if entry is None:
            if self._state is _State.CLOSED:
                raise RuntimeError("Cannot send a request, as the channel pool has been closed.")
            channel = open_channel(address, self._tls, options=self._options)
            # No serializers: bytes in, bytes out.
            entry = (channel, channel.unary_unary(INFER_METHOD))
            self._channels[address] = entry
        return entry

    async def infer(self, address: str, request: bytes, timeout_s: float, request_id: str) -> bytes:
        """Send InferRequest bytes; return InferResponse bytes.

        Raises:
            ReplicaUnavailable: the replica is down, draining, or does not hold the version:
                safe to retry on another replica.
            grpc.aio.AioRpcError: any other failure, to relay to the caller as it is.
        """
        call = self._infer_call(address)
        try:
            response: bytes = await call(
                request, timeout=timeout_s, metadata=((REQUEST_ID_METADATA_KEY, request_id),)
            )
        except grpc.aio.AioRpcError as exc:
            if refused_before_work(exc):
                raise ReplicaUnavailable(exc) from exc
            raise
        return response

    async def call(
        self, address: str, method: str, request: bytes, timeout_s: float, request_id: str
    ) -> bytes:
        """A unary call of any method on a model server, bytes in and bytes out (the rare
        calls beside Infer: OIP ModelConfig and ModelStatistics)."""
        callable_: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self._channel(address).unary_unary(method)
        response: bytes = await callable_(
            request, timeout=timeout_s, metadata=((REQUEST_ID_METADATA_KEY, request_id),)
        )
        return response

    def _retire_channels(self) -> None:
        assert self._watch is not None
        self._generation = self._watch.generation()
        for channel, _ in self._channels.values():
            task = asyncio.get_running_loop().create_task(channel.close(RETIRE_GRACE_S))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        self._channels.clear()

    async def forget(self, address: str) -> None:
        """Close the channel to a server that left the cluster."""
        entry = self._channels.pop(address, None)
        if entry is not None:
            await entry[0].close()

    async def aclose(self) -> None:
        self._state = _State.CLOSED
        channels = [c for c, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(c.close() for c in channels), *self._retiring, return_exceptions=True)

    def __del__(self) -> None:
        if getattr(self, "_channels", None):
            warnings.warn("Unclosed ChannelPool; call aclose()", ResourceWarning, stacklevel=1)
