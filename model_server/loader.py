"""Fetching a model version's artifact and turning its bytes into a runnable module.

`ArtifactSource` is the seam: the real one (`RegistryArtifactSource`) asks the registry over
gRPC; tests pass their own. Whatever the source, `load_module` verifies the bytes against the
sha256 the registry recorded *before* deserialising anything, and only formats that do not
unpickle arbitrary code are read (TorchScript and torch.export); never `torch.load`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch
import torch.export.passes  # a submodule `import torch` does not load (move_to_device_pass)

from modelyard.errors import ArtifactCorrupt, FailedPrecondition, Unavailable, VersionNotFound
from modelyard.rpc.server import channel_options
from modelyard.tls import ClientTLS, ClientTLSWatch, open_channel
from modelyard.v1 import (
    registry_pb2,
    registry_service_pb2,
    registry_service_pb2_grpc,
    tensor_pb2,
)

__all__ = [
    "Artifact",
    "ArtifactSource",
    "RegistryArtifactSource",
    "PLATFORM_BY_FORMAT",
    "verify_artifact",
    "load_module",
]

log = logging.getLogger(__name__)

PLATFORM_BY_FORMAT: dict[int, str] = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: "torchscript",
    registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT: "torch_export",
}


@dataclass(frozen=True, slots=True)
class Artifact:
    """A version's artifact bytes with what the registry recorded about them."""

    model: str
    version: int
    format: int
    """A `modelyard.v1.ArtifactFormat` value."""
    sha256: str
    """The hex sha256 the registry recorded at upload."""
    signature: tensor_pb2.Signature
    data: bytes
    input_baselines: tuple[registry_pb2.InputBaseline, ...] = ()
    """The input statistics recorded at registration (bin edges for drift counting)."""

    @property
    def platform(self) -> str:
        return PLATFORM_BY_FORMAT.get(self.format, "unknown")


class ArtifactSource(Protocol):
    """Where artifacts come from."""

    async def fetch(self, model: str, version: int) -> Artifact:
        """The artifact of one version.

        Raises:
            VersionNotFound: the source has no such version.
            Unavailable: the source cannot be reached; worth retrying.
        """
        ...


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class RegistryArtifactSource:
    """Fetches artifacts from the registry: `GetModelVersion` for what it recorded (sha256,
    format, signature), then `DownloadModelVersion` for the bytes.

    The channel is dialled on the first fetch (on the running event loop) and closed by
    `aclose()`. With TLS it is dialled again after the certificate files changed (the old one
    closes once its downloads finished).

    Args:
        address: host:port of the registry.
        max_message_bytes: Largest message accepted (a download chunk).
        tls: TLS to dial the registry with, or None for plaintext.
        timeout_s: Deadline of one fetch (metadata and the whole download).
        tls_check_interval_s: How often the TLS files are checked for a rotation.
    """

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int,
        tls: ClientTLS | None = None,
        timeout_s: float = 300.0,
        tls_check_interval_s: float = 5.0,
    ) -> None:
        self._address = address
        self._options = channel_options(max_message_bytes)
        self._tls = tls
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: registry_service_pb2_grpc.RegistryServiceAsyncStub | None = None
        self._state = _State.UNOPENED
        self._watch = ClientTLSWatch(tls, interval_s=tls_check_interval_s) if tls is not None else None
        self._generation = 0
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def _open(self) -> registry_service_pb2_grpc.RegistryServiceAsyncStub:
        if self._state is _State.CLOSED:
            raise RuntimeError("Cannot fetch from a RegistryArtifactSource after aclose().")
        if self._channel is not None:  # the TLS files changed: retire the old channel
            task = asyncio.get_running_loop().create_task(self._channel.close(self._timeout_s))
            self._retiring[task] = self._channel
            task.add_done_callback(lambda done: self._retiring.pop(done, None))
        self._generation = self._watch.generation() if self._watch is not None else 0
        self._channel = open_channel(self._address, self._tls, options=self._options)
        self._stub = registry_service_pb2_grpc.RegistryServiceStub(self._channel)
        self._state = _State.OPENED
        return self._stub

    async def aclose(self) -> None:
        """Close the channel. Safe to call twice."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        # Retired channels still downloading: their calls are cancelled now.
        retiring = dict(self._retiring)
        await asyncio.gather(*(c.close() for c in retiring.values()), *retiring, return_exceptions=True)
        self._state = _State.CLOSED

    def __del__(self) -> None:
        if getattr(self, "_state", None) is _State.OPENED:
            warnings.warn("Unclosed RegistryArtifactSource; call aclose()", ResourceWarning, stacklevel=1)

    async def fetch(self, model: str, version: int) -> Artifact:
        stale = self._watch is not None and self._watch.generation() != self._generation
        stub = self._open() if self._stub is None or stale else self._stub
        try:
            response = await stub.GetModelVersion(
                registry_service_pb2.GetModelVersionRequest(model=model, version=version),
                timeout=self._timeout_s,
            )
            record = response.model_version
            chunks: list[bytes] = []
            call = stub.DownloadModelVersion(
                registry_service_pb2.DownloadModelVersionRequest(model=model, version=version),
                timeout=self._timeout_s,
            )
            async for message in call:
                if message.sha256 and message.sha256 != record.sha256:
                    raise ArtifactCorrupt(
                        f"model {model!r} version {version}: the download announces sha256 "
                        f"{message.sha256} but the registry recorded {record.sha256}"
                    )
                chunks.append(message.chunk)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise VersionNotFound(
                    f"the registry has no model {model!r} version {version}: {exc.details()}"
                ) from None
            raise Unavailable(
                f"cannot fetch model {model!r} version {version} from the registry at "
                f"{self._address}: {exc.code().name} {exc.details()}"
            ) from None
        return Artifact(
            model=model,
            version=version,
            format=record.format,
            sha256=record.sha256,
            signature=record.signature,
            data=b"".join(chunks),
            input_baselines=tuple(record.input_baselines),
        )


def verify_artifact(artifact: Artifact) -> None:
    """Check the bytes against the sha256 the registry recorded.

    Raises:
        ArtifactCorrupt: they differ.
    """
    digest = hashlib.sha256(artifact.data).hexdigest()
    if digest != artifact.sha256.lower():
        raise ArtifactCorrupt(
            f"model {artifact.model!r} version {artifact.version}: artifact sha256 is {digest}, "
            f"the registry recorded {artifact.sha256}; refusing to load it"
        )


def _load_torchscript(data: bytes, device: str) -> torch.nn.Module:
    # torch.jit.load is unannotated in torch's own sources.
    module: torch.nn.Module = torch.jit.load(  # type: ignore[no-untyped-call]
        io.BytesIO(data), map_location=device
    )
    return module.eval()


def _load_torch_export(data: bytes, device: str) -> torch.nn.Module:
    program = torch.export.load(io.BytesIO(data))
    if device != "cpu":
        program = torch.export.passes.move_to_device_pass(program, device)
    # An exported program is already a pure inference graph; its module refuses .eval().
    return program.module()


_LOADERS: dict[int, Callable[[bytes, str], torch.nn.Module]] = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: _load_torchscript,
    registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT: _load_torch_export,
}


def load_module(artifact: Artifact, device: str) -> torch.nn.Module:
    """Verify an artifact, then deserialise it onto `device`. Blocking: run it in a thread.

    Raises:
        ArtifactCorrupt: the sha256 differs from the registry's, or the bytes are not a
            readable archive of the declared format.
        FailedPrecondition: the format is not one this server loads.
    """
    verify_artifact(artifact)
    loader = _LOADERS.get(artifact.format)
    if loader is None:
        raise FailedPrecondition(
            f"model {artifact.model!r} version {artifact.version}: artifact format "
            f"{artifact.format} is not supported; use TorchScript or torch.export"
        )
    try:
        return loader(artifact.data, device)
    except Exception as exc:
        log.exception("cannot read %s v%d as %s", artifact.model, artifact.version, artifact.platform)
        raise ArtifactCorrupt(
            f"model {artifact.model!r} version {artifact.version}: the artifact is not a "
            f"readable {artifact.platform} archive ({type(exc).__name__})"
        ) from exc
