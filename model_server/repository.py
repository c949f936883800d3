"""The model versions a model server holds: their lifecycle (load, warm up, reconfigure,
unload) and their state. No gRPC here, and no inference: `model_server.dataplane` answers
requests on the versions this repository holds ready. `load` and `unload` are driven by the
reconciler.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf import json_format

from model_server.batching import BatchConfig, Batcher
from model_server.devices import ServingConfig, cast_module, check_precision, forward_fn, resolve_device
from model_server.loader import Artifact, ArtifactSource, load_exported_program, load_module
from model_server.optimization import OptimizationReport, Optimizer, check_profile, report_for
from model_server.stats import register_input_bins
from modelyard.coordination import VersionRecord
from modelyard.errors import FailedPrecondition, ModelyardError, VersionNotReady
from modelyard.model_signatures import SignaturePolicy
from modelyard.tasks import cancel_task
from modelyard.tensor_codec import DTYPE_BY_DATA_TYPE, data_type_name
from modelyard.v1 import tensor_pb2
from modelyard.validation import SHOWN_CHARS, InputCheck, shown

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
    serving: ServingConfig = field(default_factory=ServingConfig)
    """The configuration it was loaded with (a different one reloads it)."""
    module: Any = None
    """The loaded `torch.nn.Module`; dropped on unload so its memory is returned."""
    batcher: Batcher | None = None
    error: str = ""
    """Why the last load failed (for operators; FAILED only)."""
    ready_time: float | None = None
    """Wall-clock time it became ready."""
    check: InputCheck = field(default_factory=lambda: InputCheck("", (), ()))
    """Its signature compiled for checking requests (built once at load, for the hot path)."""
    report: OptimizationReport | None = None
    """Its accuracy and speed against fp32 eager, measured at load when it runs optimised (a
    reduced precision or an optimisation profile); None when it runs as saved."""

    @property
    def output_names(self) -> tuple[str, ...]:
        """Its outputs' names, in signature order."""
        return self.check.outputs

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
            optimization=self.report.to_dict() if self.report is not None else {},
        )


def _synthetic_inputs(signature: tensor_pb2.Signature, batch_size: int) -> list[torch.Tensor]:
    """Zeros shaped by the signature, `batch_size` on dim 0 and 1 for any other dynamic dim."""
    inputs = []
    for spec in signature.inputs:
        shape = [(batch_size if i == 0 else 1) if d == -1 else d for i, d in enumerate(spec.shape)]
        inputs.append(torch.zeros(shape, dtype=DTYPE_BY_DATA_TYPE[spec.data_type]))
    return inputs


WARM_UP_EVERY_SIZE_UP_TO = 64
"""Batch sizes up to this are each warmed up; beyond it, powers of two only."""


def warm_up_sizes(config: BatchConfig) -> tuple[list[int], list[int]]:
    """The batch sizes a batching version is warmed up at, before it is ready.

    Returns:
        (sweep, settle): every size the batcher can form (up to `WARM_UP_EVERY_SIZE_UP_TO`,
        then powers of two), run once each so that TorchScript's profiling executor has seen
        the whole range of shapes; then 1, the preferred sizes and `max_batch_size`, run three
        times each, last, so that the plans kept are the ones for the whole range and the
        timings taken (which decide `auto` execution) are of optimised runs.
    """
    top = config.max_batch_size
    sweep = list(range(1, min(top, WARM_UP_EVERY_SIZE_UP_TO) + 1))
    power = 128
    while power < top:
        sweep.append(power)
        power *= 2
    settle = sorted({1, *config.preferred_batch_sizes, top})
    return [size for size in sweep if size not in settle], settle


class ModelRepository:
    """The versions this server holds: loading, serving, unloading.

    Args:
        source: Where artifacts come from (the registry in production).
        config: Batching of a version loaded without its own `ServingConfig`.
        device: Where such a version runs ("cpu", "cuda", "cuda:N", "auto").
        precision: Its compute precision ("fp32", "fp16" on GPU, "bf16").
        on_change: Called after every state change (the app pokes its heartbeat).
        signatures: Checks each version's model signature before it is loaded; unset checks
            none (tests that build their own artifacts).
        optimizer: Applies deployments' optimisation profiles; unset: one without a compile
            cache (`compile` is refused).
        report_sink: Given each report measured at load (passed or refused by the gate), to
            store it in the registry; its failures are logged, never fail the load.
        on_unloaded: Called with a version's model and number once it is unloaded (the app
            drops its request series).
    """

    def __init__(
        self,
        source: ArtifactSource,
        config: BatchConfig,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        on_change: Callable[[], None] | None = None,
        signatures: SignaturePolicy | None = None,
        optimizer: Optimizer | None = None,
        report_sink: Callable[[str, int, OptimizationReport], Awaitable[None]] | None = None,
        on_unloaded: Callable[[str, int], None] | None = None,
    ) -> None:
        self._report_sink = report_sink
        self._on_unloaded = on_unloaded or (lambda model, version: None)
        self._source = source
        self.optimizer = optimizer or Optimizer()
        self._signatures = signatures
        self.default_serving = ServingConfig(device=device, precision=precision, batch=config)
        """What a version is served with when its deployment sets nothing."""
        self._on_change = on_change or (lambda: None)
        self._versions: dict[VersionKey, LoadedVersion] = {}
        self._loads: dict[VersionKey, asyncio.Task[LoadedVersion]] = {}
        self._load_targets: dict[VersionKey, ServingConfig] = {}
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

    def highest_ready(self, model: str) -> LoadedVersion | None:
        """The model's highest version that is ready here, or None."""
        best: LoadedVersion | None = None
        for (name, _), loaded in self._versions.items():
            if name == model and loaded.state is VersionState.READY:
                if best is None or loaded.version > best.version:
                    best = loaded
        return best

    def _ready_here(self) -> str:
        ready = [
            f"{m} v{v}" for (m, v), lv in sorted(self._versions.items()) if lv.state is VersionState.READY
        ]
        return ", ".join(ready) or "none"

    def holds(self, model: str) -> bool:
        """Whether this server holds any version of the model, in whatever state."""
        return any(name == model for name, _ in self._versions)

    def ready(self, model: str, version: int) -> LoadedVersion:
        """The version if it is ready here.

        Raises:
            VersionNotReady: it is not (the message lists what is).
        """
        loaded = self._versions.get((model, version))
        if loaded is None or loaded.state is not VersionState.READY or loaded.batcher is None:
            state = "not held" if loaded is None else loaded.state.value
            raise VersionNotReady(
                f"model {shown(model)} version {version} is {state} on this server; ready here: "
                f"{self._ready_here()}",
                metadata={"model": model[:SHOWN_CHARS], "version": str(version)},
            )
        return loaded

    # -- load / unload ---------------------------------------------------------------------

    async def load(self, model: str, version: int, serving: ServingConfig | None = None) -> LoadedVersion:
        """Fetch, verify, load and warm up a version; it takes requests once this returns.

        Concurrent calls for one version share one load. A version already ready with the
        same `serving` is returned as it is; a failed one is tried again. A version ready
        with a *different* `serving` is reloaded beside the old copy, which keeps serving
        until the new one is warm, then finishes what it accepted and is dropped: no
        request fails because of a reconfiguration.

        Args:
            model: The model's name.
            version: The version number.
            serving: Device, precision and batching; None: the server's defaults.

        Raises:
            ModelyardError: the load failed (a new version stays held as FAILED, with the
                error, until `unload`; a reconfigured one keeps serving its old copy).
        """
        if self._closed:
            raise RuntimeError("Cannot load a version after aclose().")
        serving = serving or self.default_serving
        key = (model, version)
        existing = self._versions.get(key)
        if existing is not None and existing.state is VersionState.READY and existing.serving == serving:
            return existing
        task = self._loads.get(key)
        if task is not None and self._load_targets.get(key) != serving:
            # The wanted configuration changed while loading: start over with the new one.
            await cancel_task(task)
            task = None
        if task is None:
            task = asyncio.create_task(self._load(model, version, serving), name=f"load {model} v{version}")
            self._loads[key] = task
            self._load_targets[key] = serving
            task.add_done_callback(lambda t, k=key: self._load_done(k, t))  # type: ignore[misc]
        # Shielded: one waiter going away must not abort the load for the others;
        # `unload` and `aclose` cancel it explicitly.
        return await asyncio.shield(task)

    def _load_done(self, key: VersionKey, task: asyncio.Task[LoadedVersion]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
            self._load_targets.pop(key, None)
        if not task.cancelled():
            # A failure reaches the awaiters and the FAILED state; this marks it retrieved
            # even when every awaiter went away.
            task.exception()

    async def _load(self, model: str, version: int, serving: ServingConfig) -> LoadedVersion:
        key = (model, version)
        previous = self._versions.get(key)
        replacing = previous is not None and previous.state is VersionState.READY
        loaded = LoadedVersion(model=model, version=version, device=serving.device, serving=serving)
        if not replacing:
            # A reload stays invisible until warm: the old copy keeps the key meanwhile.
            self._versions[key] = loaded
            self._on_change()
        started = time.monotonic()
        try:
            await self._build(loaded)
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
            log.warning(
                "loading %s v%d failed: %s",
                model,
                version,
                loaded.error,
                exc_info=not isinstance(exc, ModelyardError),
            )
            if replacing:
                assert previous is not None
                previous.error = f"reconfiguration failed: {loaded.error}"
            self._on_change()
            raise
        loaded.state = VersionState.READY
        loaded.ready_time = time.time()
        self._versions[key] = loaded
        log.info(
            "loaded %s v%d (%s on %s, %s, optimization %s) in %.2fs",
            model,
            version,
            loaded.platform,
            loaded.device,
            serving.precision,
            serving.optimization,
            time.monotonic() - started,
        )
        self._on_change()
        if replacing and previous is not None and previous is not loaded:
            # Requests already in the old batcher finish there; new ones see the new copy.
            previous.state = VersionState.UNLOADING
            await self._discard(previous)
            gc.collect()
        return loaded

    async def _build(self, loaded: LoadedVersion) -> None:
        """Fetch, verify, load, cast and warm up `loaded` in place (not yet ready)."""
        model, version, serving = loaded.model, loaded.version, loaded.serving
        device = resolve_device(serving.device)
        compute_dtype = check_precision(serving.precision, device)
        loaded.device = device
        artifact = await self._source.fetch(model, version)
        loaded.signature = artifact.signature
        loaded.platform = artifact.platform
        self._check_signature(loaded)
        check_profile(serving.optimization, artifact.platform, device, serving.precision)
        loaded.check = InputCheck.from_proto(model, artifact.signature)
        register_input_bins(model, version, artifact.input_baselines)
        batching = loaded.check.batching
        output_dtypes = [DTYPE_BY_DATA_TYPE[spec.data_type] for spec in loaded.signature.outputs]
        started = time.perf_counter()
        module = await asyncio.to_thread(load_module, artifact, device, signatures=self._signatures)
        module, hit = await asyncio.to_thread(
            self._optimize, cast_module(module, compute_dtype), artifact, serving.optimization, device
        )
        load_s = time.perf_counter() - started
        loaded.module = module
        del module
        forward = forward_fn(loaded.module, device, compute_dtype, output_dtypes)
        if serving.optimization != "none" or compute_dtype is not None:
            # Measured before the version takes traffic, and refused here when beyond the
            # deployment's tolerance: a copy already serving keeps its settings.
            as_saved = await asyncio.to_thread(load_module, artifact, device)
            reference = forward_fn(as_saved, device, None, output_dtypes)
            loaded.report = await asyncio.to_thread(
                report_for,
                profile=serving.optimization,
                precision=serving.precision,
                device=device,
                reference=reference,
                candidate=forward,
                signature=artifact.signature,
                baselines=artifact.input_baselines,
                max_batch=serving.batch.max_batch_size,
                load_s=load_s,
                compile_cache_hit=hit,
                batching=batching,
            )
            del reference, as_saved
            if self._report_sink is not None:
                try:
                    await self._report_sink(model, version, loaded.report)
                except Exception as exc:  # noqa: BLE001 - the report is for operators, not the load
                    log.warning("could not record the report of %s v%d: %s", model, version, exc)
            violation = serving.tolerance.violation(loaded.report)
            if violation is not None:
                raise FailedPrecondition(
                    f"model {model!r} version {version}: optimization {serving.optimization!r} at "
                    f"{serving.precision} on {device} is beyond the deployment's tolerance: {violation}"
                )
        del artifact  # its bytes are no longer needed
        loaded.batcher = Batcher(
            forward,
            serving.batch,
            model_name=model,
            version=version,
            batching=batching,
            device=device,
        )
        sweep, settle = warm_up_sizes(serving.batch) if batching else ([], [1])
        for size, repeats in [*((size, 1) for size in sweep), *((size, 3) for size in settle)]:
            outputs = await loaded.batcher.warm_up(_synthetic_inputs(loaded.signature, size), repeats=repeats)
            self._check_outputs(loaded, outputs)
        await loaded.batcher.retime(_synthetic_inputs(loaded.signature, settle[-1]))
        execution = loaded.batcher.settle_execution()
        timings = ", ".join(
            f"batch {size}: {loaded.batcher.warm_up_s[size] * 1000:.2f} ms" for size in settle
        )
        log.info(
            "%s v%d runs its batches on the %s (warm-up forward: %s)",
            model,
            version,
            "event loop" if execution == "loop" else "worker thread",
            timings,
        )

    def _optimize(self, module: Any, artifact: Artifact, profile: str, device: str) -> tuple[Any, bool]:
        """Apply `profile` to a loaded module; blocking (compiling takes a while)."""
        return self.optimizer.apply(
            module,
            profile=profile,
            platform=artifact.platform,
            device=device,
            sha256=artifact.sha256,
            exported=lambda: load_exported_program(artifact.data),
            example_inputs=_synthetic_inputs(artifact.signature, 2),
            data=artifact.data,
        )

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

    async def evaluate(
        self,
        model: str,
        version: int,
        profiles: Iterable[str],
        *,
        precisions: Iterable[str] = ("fp32",),
        max_batch: int = 0,
        device: str = "",
        reference_device: str = "",
    ) -> list[OptimizationReport]:
        """Measure a version under each profile at each precision against fp32 eager, without
        changing what is served. A combination the version cannot take comes back refused
        (its `error` set); compiled packages go to the compile cache as at load.

        Args:
            device: Where the candidates run; empty: this server's default device.
            reference_device: Where the fp32 eager reference runs; empty: on `device`. The
                registry's proof of a deployment change asks for "cpu", so that a device
                change is measured against the CPU's answers, not the new device's own.

        Raises:
            FailedPrecondition: this machine does not have `device` or `reference_device`.
            ModelyardError: the artifact cannot be fetched or loaded as it is.
        """
        device = resolve_device(device or self.default_serving.device)
        on = resolve_device(reference_device) if reference_device else device
        shown_reference = on if reference_device else ""
        max_batch = max_batch or self.default_serving.batch.max_batch_size
        artifact = await self._source.fetch(model, version)
        check = InputCheck.from_proto(model, artifact.signature)
        output_dtypes = [DTYPE_BY_DATA_TYPE[spec.data_type] for spec in artifact.signature.outputs]
        as_saved = await asyncio.to_thread(load_module, artifact, on, signatures=self._signatures)
        reference = forward_fn(as_saved, on, None, output_dtypes)
        reports = []
        for profile, precision in [(p, q) for p in profiles for q in precisions]:
            try:
                compute_dtype = check_precision(precision, device)
                check_profile(profile, artifact.platform, device, precision)
                started = time.perf_counter()
                module = await asyncio.to_thread(load_module, artifact, device)
                module = cast_module(module, compute_dtype)
                module, hit = await asyncio.to_thread(self._optimize, module, artifact, profile, device)
                load_s = time.perf_counter() - started
                report = await asyncio.to_thread(
                    report_for,
                    profile=profile,
                    precision=precision,
                    device=device,
                    reference=reference,
                    candidate=forward_fn(module, device, compute_dtype, output_dtypes),
                    signature=artifact.signature,
                    baselines=artifact.input_baselines,
                    max_batch=max_batch,
                    load_s=load_s,
                    compile_cache_hit=hit,
                    batching=check.batching,
                    reference_device=shown_reference,
                )
            except ModelyardError as exc:
                report = OptimizationReport.refused(
                    profile, precision, device, exc.message, reference_device=shown_reference
                )
            except Exception as exc:  # noqa: BLE001 - a profile torch cannot apply is reported
                log.warning("evaluating %s v%d with %s failed", model, version, profile, exc_info=True)
                report = OptimizationReport.refused(
                    profile,
                    precision,
                    device,
                    f"{type(exc).__name__}: {exc}"[:300],
                    reference_device=shown_reference,
                )
            reports.append(report)
        return reports

    def fail(self, model: str, version: int, error: str) -> None:
        """Mark a version FAILED with `error` without loading it (its deployment cannot be
        served here), so that the heartbeat shows why; a ready copy keeps serving and carries
        the error instead."""
        key = (model, version)
        held = self._versions.get(key)
        if held is not None and held.state is VersionState.READY:
            held.error = f"reconfiguration failed: {error}"
        elif held is None or held.state is VersionState.FAILED:
            self._versions[key] = LoadedVersion(
                model=model, version=version, state=VersionState.FAILED, error=error
            )
        else:  # loading or unloading: that path decides the state
            return
        self._on_change()

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
        self._on_unloaded(model, version)
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
