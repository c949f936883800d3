"""The model versions a model server holds, and inference on them. No gRPC here.

`ModelRepository.infer` is the Predict path's core: find the ready version, decode and check
the inputs against its signature, submit them to the version's batcher, name and filter the
outputs. `load` and `unload` are driven by the reconciler.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf import json_format

from model_server.batching import BatchConfig, Batcher, BatchTiming
from model_server.loader import ArtifactSource, load_module
from modelyard.coordination import VersionRecord
from modelyard.errors import (
    FailedPrecondition,
    InvalidArgument,
    ModelyardError,
    SignatureMismatch,
    VersionNotReady,
)
from modelyard.tasks import cancel_task
from modelyard.tensor_codec import (
    DTYPE_BY_DATA_TYPE,
    check_tensor,
    data_type_name,
    tensor_from_proto,
    tensor_to_proto,
)
from modelyard.v1 import tensor_pb2

__all__ = ["VersionState", "LoadedVersion", "ModelRepository"]

log = logging.getLogger(__name__)

VersionKey = tuple[str, int]


class VersionState(enum.Enum):
    """Where a version is in its life on this server (the heartbeat's `state` strings)."""

    LOADING = "loading"
    READY = "ready"
    UNLOADING = "unloading"
    FAILED = "failed"


@dataclass(eq=False)
class LoadedVersion:
    """One model version held by this server, in whatever state."""

    model: str
    version: int
    state: VersionState = VersionState.LOADING
    device: str = "cpu"
    signature: tensor_pb2.Signature = field(default_factory=tensor_pb2.Signature)
    platform: str = ""
    module: Any = None
    """The loaded `torch.nn.Module`; dropped on unload so its memory is returned."""
    batcher: Batcher | None = None
    error: str = ""
    """Why the last load failed (for operators; FAILED only)."""
    ready_time: float | None = None
    """Wall-clock time it became ready."""
    # Built once at load, for the hot path.
    input_index: dict[str, int] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)

    @property
    def outstanding(self) -> int:
        """Requests waiting or computing in its batcher."""
        return self.batcher.outstanding if self.batcher is not None else 0

    def record(self) -> VersionRecord:
        """This version as the heartbeat reports it."""
        return VersionRecord(
            model=self.model,
            version=self.version,
            state=self.state.value,
            device=self.device,
            outstanding=self.outstanding,
            error=self.error,
            signature=json_format.MessageToDict(self.signature),
            platform=self.platform,
        )


def _forward_fn(module: Any, device: str) -> Callable[..., Any]:
    """The batcher's model callable: inputs to the device, forward, outputs back to the CPU."""
    if device == "cpu":
        return module  # type: ignore[no-any-return]  # an nn.Module is the callable itself

    def forward(*inputs: torch.Tensor) -> Any:
        result = module(*(t.to(device, non_blocking=True) for t in inputs))
        if isinstance(result, torch.Tensor):
            return result.cpu()
        return type(result)(t.cpu() for t in result)

    return forward


def _synthetic_inputs(signature: tensor_pb2.Signature, batch_size: int) -> list[torch.Tensor]:
    """Zeros shaped by the signature, `batch_size` on dim 0 and 1 for any other dynamic dim."""
    inputs = []
    for spec in signature.inputs:
        shape = [
            (batch_size if i == 0 else 1) if d == -1 else d for i, d in enumerate(spec.shape)
        ]
        inputs.append(torch.zeros(shape, dtype=DTYPE_BY_DATA_TYPE[spec.data_type]))
    return inputs


def _is_batching(signature: tensor_pb2.Signature) -> bool:
    return all(len(spec.shape) > 0 and spec.shape[0] == -1 for spec in signature.inputs)


class ModelRepository:
    """The versions this server holds: loading, serving, unloading.

    Args:
        source: Where artifacts come from (the registry in production).
        config: Batching of every version.
        device: Where models run ("cpu").
        on_change: Called after every state change (the app pokes its heartbeat).
    """

    def __init__(
        self,
        source: ArtifactSource,
        config: BatchConfig,
        *,
        device: str = "cpu",
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._source = source
        self._config = config
        self._device = device
        self._on_change = on_change or (lambda: None)
        self._versions: dict[VersionKey, LoadedVersion] = {}
        self._loads: dict[VersionKey, asyncio.Task[LoadedVersion]] = {}
        self._closed = False

    # -- reads -----------------------------------------------------------------------------

    def get(self, model: str, version: int) -> LoadedVersion | None:
        """The version in whatever state, or None if this server does not hold it."""
        return self._versions.get((model, version))

    def versions(self) -> list[LoadedVersion]:
        """Every version held, sorted by model and version."""
        return [self._versions[k] for k in sorted(self._versions)]

    def keys(self) -> Iterable[VersionKey]:
        """(model, version) of every version held, in whatever state."""
        return list(self._versions)

    def records(self) -> list[VersionRecord]:
        """Every version held, as the heartbeat reports them."""
        return [v.record() for v in self.versions()]

    def _ready_here(self) -> str:
        ready = [f"{m} v{v}" for (m, v), lv in sorted(self._versions.items())
                 if lv.state is VersionState.READY]
        return ", ".join(ready) or "none"

    # -- the Predict path ------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        version: int,
        inputs: Sequence[tensor_pb2.Tensor],
        output_names: Sequence[str],
        deadline: float | None,
        *,
        request_id: str = "",
    ) -> tuple[list[tensor_pb2.Tensor], BatchTiming]:
        """Run one request through the version's batcher.

        Args:
            model: The model's name.
            version: The exact version.
            inputs: Wire tensors, named as in the signature (any order).
            output_names: Outputs to return; empty means all, in signature order.
            deadline: `loop.time()` after which the request is dropped before compute.
            request_id: For the log if the batch fails.

        Returns:
            The output wire tensors and the request's timing.

        Raises:
            VersionNotReady: the version is not ready here (the message lists what is).
            SignatureMismatch: an input is missing, unknown, repeated, or of the wrong
                dtype or shape (the field names the input).
            InvalidArgument: an unknown output name, or inputs disagreeing on dim 0.
            QueueFull, DeadlineExceeded, ModelExecutionError, Draining: from the batcher.
        """
        loaded = self._versions.get((model, version))
        if loaded is None or loaded.state is not VersionState.READY or loaded.batcher is None:
            state = "not held" if loaded is None else loaded.state.value
            raise VersionNotReady(
                f"model {model!r} version {version} is {state} on this server; ready here: "
                f"{self._ready_here()}",
                metadata={"model": model, "version": str(version)},
            )
        tensors = self._decode(loaded, inputs)
        selected = self._select_outputs(loaded, output_names)
        outputs, timing = await loaded.batcher.submit(tensors, deadline, request_id=request_id)
        names = loaded.output_names
        if selected is None:
            return [tensor_to_proto(name, t) for name, t in zip(names, outputs, strict=True)], timing
        return [tensor_to_proto(names[i], outputs[i]) for i in selected], timing

    @staticmethod
    def _decode(loaded: LoadedVersion, inputs: Sequence[tensor_pb2.Tensor]) -> list[torch.Tensor]:
        specs = loaded.signature.inputs
        slots: list[torch.Tensor | None] = [None] * len(specs)
        for message in inputs:
            index = loaded.input_index.get(message.name)
            if index is None:
                raise SignatureMismatch(
                    f"unknown input {message.name!r}; model {loaded.model!r} takes "
                    f"{', '.join(repr(n) for n in loaded.input_index)}",
                    field=f"inputs[{message.name}]",
                )
            if slots[index] is not None:
                raise SignatureMismatch(
                    f"input {message.name!r} is given twice", field=f"inputs[{message.name}]"
                )
            spec = specs[index]
            tensor = tensor_from_proto(message)
            check_tensor(spec.name, tensor, spec.data_type, spec.shape)
            slots[index] = tensor
        for spec, tensor in zip(specs, slots, strict=True):
            if tensor is None:
                raise SignatureMismatch(
                    f"input {spec.name!r} ({data_type_name(spec.data_type)}) is missing",
                    field=f"inputs[{spec.name}]",
                )
        return slots  # type: ignore[return-value]  # every slot was checked to be filled

    @staticmethod
    def _select_outputs(loaded: LoadedVersion, output_names: Sequence[str]) -> list[int] | None:
        if not output_names:
            return None
        names = loaded.output_names
        selected = []
        for name in output_names:
            try:
                selected.append(names.index(name))
            except ValueError:
                raise InvalidArgument(
                    f"unknown output {name!r}; model {loaded.model!r} returns "
                    f"{', '.join(repr(n) for n in names)}",
                    field="output_names",
                ) from None
        return selected

    # -- load / unload ---------------------------------------------------------------------

    async def load(self, model: str, version: int) -> LoadedVersion:
        """Fetch, verify, load and warm up a version; it takes requests once this returns.

        Concurrent calls for one version share one load. A version already ready is
        returned as it is; a failed one is tried again.

        Raises:
            ModelyardError: the load failed (the version stays held as FAILED, with the
                error, until `unload`).
        """
        if self._closed:
            raise RuntimeError("Cannot load a version after aclose().")
        key = (model, version)
        existing = self._versions.get(key)
        if existing is not None and existing.state is VersionState.READY:
            return existing
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(self._load(model, version), name=f"load {model} v{version}")
            self._loads[key] = task
            task.add_done_callback(lambda t, k=key: self._load_done(k, t))  # type: ignore[misc]
        # Shielded: one waiter going away must not abort the load for the others;
        # `unload` and `aclose` cancel it explicitly.
        return await asyncio.shield(task)

    def _load_done(self, key: VersionKey, task: asyncio.Task[LoadedVersion]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        if not task.cancelled():
            # A failure reaches the awaiters and the FAILED state; this marks it retrieved
            # even when every awaiter went away.
            task.exception()

    async def _load(self, model: str, version: int) -> LoadedVersion:
        key = (model, version)
        loaded = LoadedVersion(model=model, version=version, device=self._device)
        self._versions[key] = loaded
        self._on_change()
        started = time.monotonic()
        try:
            artifact = await self._source.fetch(model, version)
            loaded.signature = artifact.signature
            loaded.platform = artifact.platform
            self._check_signature(loaded)
            loaded.input_index = {spec.name: i for i, spec in enumerate(artifact.signature.inputs)}
            loaded.output_names = [spec.name for spec in artifact.signature.outputs]
            loaded.module = await asyncio.to_thread(load_module, artifact, self._device)
            del artifact  # its bytes are no longer needed
            batching = _is_batching(loaded.signature)
            loaded.batcher = Batcher(
                _forward_fn(loaded.module, self._device),
                self._config,
                model_name=model,
                version=version,
                batching=batching,
            )
            sizes = sorted({1, self._config.max_batch_size}) if batching else [1]
            for size in sizes:
                outputs = await loaded.batcher.warm_up(_synthetic_inputs(loaded.signature, size))
                self._check_outputs(loaded, outputs)
        except asyncio.CancelledError:
            await self._discard(loaded)
            if self._versions.get(key) is loaded:
                del self._versions[key]
            self._on_change()
            raise
        except Exception as exc:
            await self._discard(loaded)
            loaded.state = VersionState.FAILED
            loaded.error = exc.message if isinstance(exc, ModelyardError) else f"{type(exc).__name__}: {exc}"
            log.warning("loading %s v%d failed: %s", model, version, loaded.error,
                        exc_info=not isinstance(exc, ModelyardError))
            self._on_change()
            raise
        loaded.state = VersionState.READY
        loaded.ready_time = time.time()
        log.info("loaded %s v%d (%s on %s) in %.2fs", model, version, loaded.platform,
                 self._device, time.monotonic() - started)
        self._on_change()
        return loaded

    @staticmethod
    def _check_signature(loaded: LoadedVersion) -> None:
        signature = loaded.signature
        if not signature.inputs or not signature.outputs:
            raise FailedPrecondition(
                f"model {loaded.model!r} version {loaded.version}: its signature must name at "
                "least one input and one output"
            )
        for spec in [*signature.inputs, *signature.outputs]:
            if spec.data_type not in DTYPE_BY_DATA_TYPE:
                raise FailedPrecondition(
                    f"model {loaded.model!r} version {loaded.version}: tensor {spec.name!r} has "
                    f"unsupported data type {data_type_name(spec.data_type)}"
                )
        for kind, specs in (("input", signature.inputs), ("output", signature.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise FailedPrecondition(
                    f"model {loaded.model!r} version {loaded.version}: {kind} names repeat: {names}"
                )

    @staticmethod
    def _check_outputs(loaded: LoadedVersion, outputs: list[torch.Tensor]) -> None:
        """The warm-up outputs must match the signature, or the version never becomes ready."""
        specs = loaded.signature.outputs
        where = f"model {loaded.model!r} version {loaded.version}"
        if len(outputs) != len(specs):
            raise FailedPrecondition(
                f"{where}: the model returns {len(outputs)} outputs, its signature names {len(specs)}"
            )
        for spec, tensor in zip(specs, outputs, strict=True):
            expected = DTYPE_BY_DATA_TYPE[spec.data_type]
            if tensor.dtype != expected:
                raise FailedPrecondition(
                    f"{where}: output {spec.name!r} is {tensor.dtype}, its signature says "
                    f"{data_type_name(spec.data_type)}"
                )
            if len(tensor.shape) != len(spec.shape) or any(
                d not in (-1, a) for a, d in zip(tensor.shape, spec.shape, strict=True)
            ):
                raise FailedPrecondition(
                    f"{where}: output {spec.name!r} has shape {list(tensor.shape)}, its signature "
                    f"says {list(spec.shape)}"
                )

    async def unload(self, model: str, version: int) -> None:
        """Stop taking new work for a version, finish what it accepted, and drop it so its
        memory is returned. Cancels a load in progress. A no-op if not held."""
        key = (model, version)
        await cancel_task(self._loads.get(key))
        loaded = self._versions.get(key)
        if loaded is None:
            return
        if loaded.state is VersionState.READY:
            loaded.state = VersionState.UNLOADING
            self._on_change()
        await self._discard(loaded)
        if self._versions.get(key) is loaded:
            del self._versions[key]
        # The module is unreachable now; collect any reference cycles at once so the
        # memory goes back now rather than at the next automatic collection.
        gc.collect()
        log.info("unloaded %s v%d", model, version)
        self._on_change()

    @staticmethod
    async def _discard(loaded: LoadedVersion) -> None:
        if loaded.batcher is not None:
            await loaded.batcher.aclose()
        loaded.batcher = None
        loaded.module = None

    async def aclose(self) -> None:
        """Cancel loads, then drain and drop every version (accepted requests finish)."""
        self._closed = True
        for task in list(self._loads.values()):
            await cancel_task(task)
        await asyncio.gather(*(self.unload(m, v) for m, v in list(self._versions)))
