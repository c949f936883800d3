"""Fetching a model version's artifact and turning its bytes into a runnable module.

`ArtifactSource` is the seam: the real one (`RegistryArtifactSource`) asks the registry over
gRPC; tests pass their own. Whatever the source, `load_module`, before any torch loader sees a
byte: verifies the bytes against the sha256 the registry recorded, and repeats the registry's
static inspection (`modelyard.artifact_check`), so an artifact planted in a store or stored
before the inspection existed is refused too. Then only loaders that cannot unpickle Python
objects are used: `torch.jit.load` (TorchScript's own unpickler resolves only tensor and
TorchScript types) and, for torch.export, `load_exported_program` below, which builds the
weights and constants from raw tensor payloads and never reads the pickled sample inputs;
`torch.export.load` is not used because its pt2 loader calls `torch.load(weights_only=False)`
and `pickle.loads` for parts an archive marks as pickled. Never `torch.load`.
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
from torch._export.serde import schema as _schema
from torch._export.serde import serialize as _serialize
from torch.export.pt2_archive import _package
from torch.export.pt2_archive import constants as _constants
from torch.export.pt2_archive._package import PT2ArchiveReader

from modelyard.access.client import bearer
from modelyard.artifact_check import ArchiveKind, inspect_archive
from modelyard.errors import (
    ArtifactCorrupt,
    FailedPrecondition,
    ModelSignatureInvalid,
    Unavailable,
    UnsafeArtifact,
    VersionNotFound,
)
from modelyard.model_signatures import SignaturePolicy
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
    "load_exported_program",
    "load_module",
]

log = logging.getLogger(__name__)

PLATFORM_BY_FORMAT: dict[int, str] = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: "torchscript",
    registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT: "torch_export",
}

_ARCHIVE_KIND: dict[int, ArchiveKind] = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: ArchiveKind.TORCHSCRIPT,
    registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT: ArchiveKind.TORCH_EXPORT,
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
    model_signature: bytes = b""
    """The OpenSSF model signing bundle uploaded with the version; empty when unsigned."""
    signature_required: bool = False
    """The version's model requires a signature."""

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
    """Fetches artifacts from the registry: `GetModel` (whether it requires signed versions)
    and `GetModelVersion` for what it recorded (sha256, format, signature, model signature),
    then `DownloadModelVersion` for the bytes.

    The channel is dialled on the first fetch (on the running event loop) and closed by
    `aclose()`. With TLS it is dialled again after the certificate files changed (the old one
    closes once its downloads finished).

    Args:
        address: host:port of the registry.
        max_message_bytes: Largest message accepted (a download chunk).
        tls: TLS to dial the registry with, or None for plaintext.
        timeout_s: Deadline of one fetch (metadata and the whole download).
        tls_check_interval_s: How often the TLS files are checked for a rotation.
        token: The model server's service token (artifact download is internal).
    """

    def __init__(
        self,
        address: str,
        *,
        max_message_bytes: int,
        tls: ClientTLS | None = None,
        timeout_s: float = 300.0,
        tls_check_interval_s: float = 5.0,
        token: str | None = None,
    ) -> None:
        self._address = address
        self._token = token
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
        self._channel = open_channel(
            self._address, self._tls, options=self._options, interceptors=bearer(self._token)
        )
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
            model_record = await stub.GetModel(
                registry_service_pb2.GetModelRequest(name=model), timeout=self._timeout_s
            )
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
            model_signature=record.model_signature,
            signature_required=model_record.model.require_signature,
        )

    async def record_reports(
        self,
        model: str,
        version: int,
        reports: list[registry_pb2.OptimizationReport],
        *,
        timeout_s: float = 5.0,
    ) -> None:
        """Store measured optimisation reports with the version in the registry.

        Raises:
            Unavailable: the registry did not take them.
        """
        stale = self._watch is not None and self._watch.generation() != self._generation
        stub = self._open() if self._stub is None or stale else self._stub
        try:
            await stub.RecordOptimizationReports(
                registry_service_pb2.RecordOptimizationReportsRequest(
                    model=model, version=version, reports=reports
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                f"cannot record the optimisation reports of model {model!r} version {version}: "
                f"{exc.code().name} {exc.details()}"
            ) from None


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


def _raw_tensors(
    reader: PT2ArchiveReader, config_file: str, directory: str, *, params: bool
) -> dict[str, torch.Tensor]:
    """The tensors a weights or constants config describes, from their raw payloads; the
    pickled forms (`use_pickle`, custom and opaque objects) are refused, never read."""
    config = _package._load_payload_config(reader, config_file)
    for fqn, meta in config.config.items():
        if meta.use_pickle or meta.tensor_meta is None:
            raise UnsafeArtifact(
                f"{config_file} marks {fqn[:80]!r} as pickled", metadata={"member": config_file}
            )
    by_file = _package._build_file_map(reader, config, directory)
    tensors: dict[str, torch.Tensor] = {}
    for fqn, meta in config.config.items():
        assert meta.tensor_meta is not None
        tensor = torch.as_strided(
            by_file[meta.path_name],
            size=_serialize.deserialize_size(meta.tensor_meta.sizes),
            stride=_serialize.deserialize_stride(meta.tensor_meta.strides),
            storage_offset=_serialize.deserialize_storage_offset(meta.tensor_meta.storage_offset),
        )
        if params and meta.is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=meta.tensor_meta.requires_grad)
        tensors[fqn] = tensor
    return tensors


def load_exported_program(data: bytes, model_name: str = "model") -> torch.export.ExportedProgram:
    """Deserialise a torch.export archive without unpickling anything.

    The same steps as `torch.export.load` for one model, except that weights and constants come
    only from raw tensor payloads and the sample inputs (a pickle) are not read at all: the
    program does not need them to run. Call it on an archive `inspect_archive` passed.
    """
    with PT2ArchiveReader(io.BytesIO(data)) as reader:
        version = reader.read_string(_constants.ARCHIVE_VERSION_PATH)
        if version != _constants.ARCHIVE_VERSION_VALUE:
            raise ValueError(f"pt2 archive version {version!r} is not {_constants.ARCHIVE_VERSION_VALUE!r}")
        serialized = _serialize._bytes_to_dataclass(
            _schema.ExportedProgram, reader.read_bytes(_constants.MODELS_FILENAME_FORMAT.format(model_name))
        )
        state_dict = _raw_tensors(
            reader,
            _constants.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model_name),
            _constants.WEIGHTS_DIR,
            params=True,
        )
        constants = _raw_tensors(
            reader,
            _constants.CONSTANTS_CONFIG_FILENAME_FORMAT.format(model_name),
            _constants.CONSTANTS_DIR,
            params=False,
        )
    deserializer = _serialize.ExportedProgramDeserializer(None)
    program: torch.export.ExportedProgram = deserializer.deserialize(serialized, state_dict, constants, b"")
    return program


def _load_torch_export(data: bytes, device: str) -> torch.nn.Module:
    program = load_exported_program(data)
    if device != "cpu":
        program = torch.export.passes.move_to_device_pass(program, device)
    # An exported program is already a pure inference graph; its module refuses .eval().
    return program.module()


_LOADERS: dict[int, Callable[[bytes, str], torch.nn.Module]] = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: _load_torchscript,
    registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT: _load_torch_export,
}


def load_module(
    artifact: Artifact, device: str, *, signatures: SignaturePolicy | None = None
) -> torch.nn.Module:
    """Verify and inspect an artifact, then deserialise it onto `device`. Blocking: run it in
    a thread.

    In order, before any torch loader runs: the bytes against the recorded sha256; the model
    signature (with `signatures`: a signed version must verify, and an unsigned one is
    refused if its model or the cluster requires signatures); the static inspection.

    Raises:
        ArtifactCorrupt: the sha256 differs from the registry's, or the bytes are not a
            readable archive of the declared format.
        ModelSignatureInvalid: the model signature does not verify or is missing.
        UnsafeArtifact: the static inspection refused a member (nothing was deserialised).
        FailedPrecondition: the format is not one this server loads.
    """
    verify_artifact(artifact)
    if signatures is not None:
        try:
            signer = signatures.check(
                artifact.model_signature,
                sha256=artifact.sha256,
                required=artifact.signature_required,
                field="model_signature",
            )
        except ModelSignatureInvalid as exc:
            log.error("refusing to load %s v%d: %s", artifact.model, artifact.version, exc.message)
            raise ModelSignatureInvalid(
                f"model {artifact.model!r} version {artifact.version}: refusing to load it: {exc.message}",
                metadata=exc.metadata,
            ) from None
        if signer:
            log.info("%s v%d is signed by %s", artifact.model, artifact.version, signer)
    loader = _LOADERS.get(artifact.format)
    if loader is None:
        raise FailedPrecondition(
            f"model {artifact.model!r} version {artifact.version}: artifact format "
            f"{artifact.format} is not supported; use TorchScript or torch.export"
        )
    try:
        inspect_archive(artifact.data, _ARCHIVE_KIND[artifact.format])
    except UnsafeArtifact as exc:
        log.error("refusing to load %s v%d: %s", artifact.model, artifact.version, exc.message)
        raise UnsafeArtifact(
            f"model {artifact.model!r} version {artifact.version}: refusing to load it: {exc.message}",
            metadata=exc.metadata,
        ) from None
    try:
        return loader(artifact.data, device)
    except Exception as exc:
        log.exception("cannot read %s v%d as %s", artifact.model, artifact.version, artifact.platform)
        raise ArtifactCorrupt(
            f"model {artifact.model!r} version {artifact.version}: the artifact is not a "
            f"readable {artifact.platform} archive ({type(exc).__name__})"
        ) from exc
