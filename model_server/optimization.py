"""Serving-time optimisation profiles and the accuracy and speed report that gates them.

A deployment's `optimization` profile is applied when a version loads, after the precision
cast, at the same place (`model_server.repository.ModelRepository._build`):

- `none`: the module as loaded.
- `int8_dynamic`: dynamic int8 quantisation of Linear (and LSTM) layers, CPU only. Only
  TorchScript takes it, through the graph-mode `quantize_dynamic_jit`: eager
  `quantize_dynamic` swaps `nn.Linear` submodules, and a ScriptModule or an exported
  program's module has none, so it would return the model unchanged without a word. It runs
  in a child process (`model_server.quantize_worker`): the graph-mode quantiser is native code
  that segfaults on some graphs (a scripted TransformerEncoder), and a crash must fail the
  load, not the server.
- `freeze`: TorchScript only: `torch.jit.freeze` (weights become constants) then
  `torch.jit.optimize_for_inference` (conv-bn folding, MKLDNN layouts on CPU).
- `compile`: torch.export only: AOTInductor compiles the program for the server's device
  into a `.pt2` package, cached on disk by artifact sha256, device, torch version and
  profile, so a restart loads the package instead of compiling again.

A profile a version cannot take raises `FailedPrecondition` with the reason; the repository
fails that load and a copy already serving keeps serving.

The report compares the optimised version with the fp32 eager reference (the same artifact
loaded as it is) on a sample drawn from the version's registered input baseline: each feature
from a normal distribution with the baseline's mean and standard deviation (the registry keeps
statistics, not the sample itself); columns past the baseline's first 32, and inputs with no
baseline, are standard normal. It gives the largest absolute and relative error, top-1
agreement for classifier-shaped outputs, items/s at batch 1 and at the largest batch, and the
load time; `Tolerance.violation` says whether a deployment's tolerance refuses it.
"""

from __future__ import annotations

import io
import logging
import math
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.export.passes  # a submodule `import torch` does not load (move_to_device_pass)
from google.protobuf import duration_pb2

from modelyard.errors import FailedPrecondition
from modelyard.tensor_codec import DTYPE_BY_DATA_TYPE
from modelyard.v1 import registry_pb2, tensor_pb2

__all__ = [
    "PROFILES",
    "Tolerance",
    "OptimizationReport",
    "CompileCache",
    "Optimizer",
    "check_profile",
    "compare_outputs",
    "sample_inputs",
    "items_per_s",
    "report_for",
]

log = logging.getLogger(__name__)

PROFILES: tuple[str, ...] = ("none", "int8_dynamic", "freeze", "compile")
"""Every optimisation profile, in the order `modelyard optimize` tries them."""

_FORMATS_BY_PROFILE: dict[str, frozenset[str]] = {
    "none": frozenset({"torchscript", "torch_export"}),
    "int8_dynamic": frozenset({"torchscript"}),
    "freeze": frozenset({"torchscript"}),
    "compile": frozenset({"torch_export"}),
}

_WHY_NOT: dict[tuple[str, str], str] = {
    ("int8_dynamic", "torch_export"): (
        "an exported program's module has no nn.Linear submodules for quantize_dynamic to swap "
        "(it would serve the model unchanged); upload a TorchScript artifact to quantise it"
    ),
    ("freeze", "torch_export"): "freeze is TorchScript's freezing; an exported program takes `compile`",
    ("compile", "torchscript"): "compile builds torch.export programs with AOTInductor; "
    "TorchScript takes `freeze`",
}

RELATIVE_FLOOR = 1e-3
"""A relative error divides by max(|reference|, RELATIVE_FLOOR * max|reference|), so that
elements near zero do not turn a tiny absolute difference into an unbounded ratio."""


def check_profile(profile: str, platform: str, device: str, precision: str = "fp32") -> None:
    """Refuse a profile this version or this server cannot take.

    Args:
        profile: One of `PROFILES`.
        platform: The artifact's platform ("torchscript" or "torch_export").
        device: The resolved device ("cpu" or "cuda:N").
        precision: The deployment's precision.

    Raises:
        FailedPrecondition: an unknown profile, a format that cannot take it, int8 off the
            CPU, or a profile combined with a reduced precision; the message says which.
    """
    if profile not in _FORMATS_BY_PROFILE:
        raise FailedPrecondition(f"optimization {profile!r} is not valid; use one of {', '.join(PROFILES)}")
    if platform not in _FORMATS_BY_PROFILE[profile]:
        reason = _WHY_NOT.get((profile, platform), "this format cannot take it")
        raise FailedPrecondition(
            f"optimization {profile!r} does not apply to a {platform} artifact: {reason}"
        )
    if profile == "int8_dynamic" and device != "cpu":
        raise FailedPrecondition("optimization 'int8_dynamic' runs on the CPU only (quantized CPU kernels)")
    if profile in ("int8_dynamic", "compile") and precision not in ("", "fp32"):
        raise FailedPrecondition(
            f"optimization {profile!r} starts from fp32 weights; set precision fp32 (it is {precision!r})"
        )


@dataclass(frozen=True, slots=True)
class Tolerance:
    """How far an optimised version may stray from fp32 eager; None: no limit."""

    max_abs_error: float | None = None
    """The largest absolute difference of any output element."""
    min_top1_agreement: float | None = None
    """The least fraction of items whose top-1 class matches (classifier-shaped outputs)."""

    def violation(self, report: OptimizationReport) -> str | None:
        """Why the report is beyond this tolerance, or None when it is within."""
        if self.max_abs_error is not None and report.max_abs_error > self.max_abs_error:
            return f"max abs error {report.max_abs_error:.3g} > max_abs_error {self.max_abs_error:.3g}"
        if (
            self.min_top1_agreement is not None
            and report.top1_agreement is not None
            and report.top1_agreement < self.min_top1_agreement
        ):
            return (
                f"top-1 agreement {report.top1_agreement:.4f} < min_top1_agreement "
                f"{self.min_top1_agreement:.4f}"
            )
        return None


@dataclass(frozen=True, slots=True)
class OptimizationReport:
    """Accuracy and speed of one version × profile × device against fp32 eager."""

    profile: str
    precision: str
    device: str
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None
    """None: no output is classifier-shaped ([batch, classes], 2 classes or more)."""
    items_per_s_batch1: float
    items_per_s_max_batch: float
    max_batch: int
    load_s: float
    """Loading and optimising (compiling, or reading the cached package), before warm-up."""
    sample: str
    """"baseline" (drawn from the registered input baseline) or "synthetic" (standard normal:
    the version has no baseline for some input)."""
    sample_items: int
    compile_cache_hit: bool = False
    error: str = ""
    """Why the profile could not be applied; the figures are zero when set."""
    reference_device: str = ""
    """Where the fp32 eager reference ran; empty: on `device` too."""

    @classmethod
    def refused(
        cls, profile: str, precision: str, device: str, error: str, *, reference_device: str = ""
    ) -> OptimizationReport:
        """The report of a profile that could not be applied."""
        return cls(
            reference_device=reference_device,
            profile=profile,
            precision=precision or "fp32",
            device=device,
            max_abs_error=0.0,
            max_rel_error=0.0,
            top1_agreement=None,
            items_per_s_batch1=0.0,
            items_per_s_max_batch=0.0,
            max_batch=0,
            load_s=0.0,
            sample="",
            sample_items=0,
            error=error,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_proto(self, server_id: str) -> registry_pb2.OptimizationReport:
        """The report as the registry stores it, stamped with who measured it, and now."""
        nanos = int(self.load_s * 1e9)
        message = registry_pb2.OptimizationReport(
            optimization=self.profile,
            precision=self.precision,
            device=self.device,
            max_abs_error=self.max_abs_error,
            max_rel_error=self.max_rel_error,
            items_per_s_batch1=self.items_per_s_batch1,
            items_per_s_max_batch=self.items_per_s_max_batch,
            max_batch=self.max_batch,
            load_time=duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000),
            sample=self.sample,
            sample_items=self.sample_items,
            compile_cache_hit=self.compile_cache_hit,
            error=self.error,
            server_id=server_id,
            reference_device=self.reference_device,
        )
        if self.top1_agreement is not None:
            message.top1_agreement = self.top1_agreement
        message.time.GetCurrentTime()
        return message


def _flat_outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for t in result if isinstance(t, torch.Tensor)]


def compare_outputs(
    reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]
) -> tuple[float, float, float | None]:
    """Largest absolute error, largest relative error and top-1 agreement of `candidate`
    against `reference` (same outputs, same order).

    The relative error of an element is |c - r| / max(|r|, RELATIVE_FLOOR * max|r|). Top-1
    agreement is over the classifier-shaped outputs ([batch, classes], 2 classes or more):
    the fraction of rows whose argmax matches; None when there is none. A non-finite
    candidate value counts as an infinite error.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} outputs against {len(reference)} in the reference")
    max_abs = 0.0
    max_rel = 0.0
    agree = 0
    rows = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref64 = ref.detach().to(torch.float64)
        cand64 = cand.detach().to(torch.float64)
        if ref64.shape != cand64.shape:
            raise ValueError(f"output shape {list(cand64.shape)} against {list(ref64.shape)}")
        if ref64.numel() == 0:
            continue
        diff = (cand64 - ref64).abs()
        diff = torch.where(torch.isfinite(diff), diff, torch.full_like(diff, math.inf))
        max_abs = max(max_abs, float(diff.max()))
        scale = float(ref64.abs().max())
        floor = max(RELATIVE_FLOOR * scale, torch.finfo(torch.float64).tiny)
        max_rel = max(max_rel, float((diff / ref64.abs().clamp_min(floor)).max()))
        if ref.is_floating_point() and ref64.dim() == 2 and ref64.shape[1] >= 2:
            agree += int((ref64.argmax(dim=1) == cand64.argmax(dim=1)).sum())
            rows += ref64.shape[0]
    return max_abs, max_rel, (agree / rows if rows else None)


def sample_inputs(
    signature: tensor_pb2.Signature,
    baselines: Sequence[registry_pb2.InputBaseline],
    items: int,
    *,
    seed: int = 0,
) -> tuple[list[torch.Tensor], str]:
    """`items` inputs drawn from the baselines (see the module docstring), and "baseline" or
    "synthetic" (some floating input had no baseline). Dynamic dims other than the batch are 1;
    integer inputs are zeros (ids and masks have no distribution to draw from here)."""
    by_name = {b.input: b for b in baselines}
    generator = torch.Generator().manual_seed(seed)
    inputs: list[torch.Tensor] = []
    kind = "baseline"
    for spec in signature.inputs:
        shape = [(items if i == 0 else 1) if d == -1 else d for i, d in enumerate(spec.shape)]
        dtype = DTYPE_BY_DATA_TYPE[spec.data_type]
        if not dtype.is_floating_point:
            inputs.append(torch.zeros(shape, dtype=dtype))
            continue
        values = torch.randn(shape, generator=generator, dtype=torch.float32)
        baseline = by_name.get(spec.name)
        if baseline is None or not baseline.features:
            kind = "synthetic"
        else:
            flat = values.reshape(shape[0], -1) if shape else values.reshape(1, -1)
            for column, feature in enumerate(baseline.features[: flat.shape[1]]):
                flat[:, column] = flat[:, column] * feature.std + feature.mean
            values = flat.reshape(shape)
        inputs.append(values.to(dtype))
    return inputs, kind


def items_per_s(
    forward: Callable[..., Any], inputs: Sequence[torch.Tensor], *, budget_s: float = 0.3
) -> float:
    """Items per second of `forward` on `inputs` (batch on dim 0): three warm calls, then as
    many as fit in `budget_s` (at least three)."""
    batch = inputs[0].shape[0] if inputs and inputs[0].dim() > 0 else 1
    with torch.inference_mode():
        for _ in range(3):
            forward(*inputs)
        calls = 0
        started = time.perf_counter()
        while calls < 3 or time.perf_counter() - started < budget_s:
            forward(*inputs)
            calls += 1
        elapsed = time.perf_counter() - started
    return calls * batch / elapsed


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.+-]")


QUANTIZE_TIMEOUT_S = 600.0
"""The longest the quantising child may take before the load fails."""


def _quantize_in_child(data: bytes) -> Any:
    """Dynamic int8 quantisation of TorchScript bytes in `model_server.quantize_worker` (a
    child process: torch's graph-mode quantiser can crash natively), loaded back here.

    Raises:
        FailedPrecondition: the child crashed, failed or timed out; the message says how.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "model_server.quantize_worker"],
            input=data,
            capture_output=True,
            timeout=QUANTIZE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FailedPrecondition(
            f"optimization 'int8_dynamic': quantising took over {QUANTIZE_TIMEOUT_S:.0f}s"
        ) from None
    if done.returncode != 0:
        if done.returncode < 0:
            how = f"crashed with {signal.Signals(-done.returncode).name}"
        else:
            last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            how = f"failed: {last[0][:200]}"
        raise FailedPrecondition(
            f"optimization 'int8_dynamic': torch's graph-mode quantiser {how} on this model; "
            "serve it with none or freeze"
        )
    # torch.jit.load is unannotated in torch's own sources.
    module = torch.jit.load(io.BytesIO(done.stdout), map_location="cpu")  # type: ignore[no-untyped-call]
    return module.eval()


class CompileCache:
    """AOTInductor packages on disk, one per artifact sha256 × device × torch version × profile.

    Writes go to a temporary name first and are renamed into place, so a server that dies
    mid-compile leaves no half package that a restart would load.

    Args:
        directory: Where the packages live (created on first use).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        """Loads served from a package already on disk (this process)."""
        self.misses = 0
        """Loads that compiled (this process)."""
        self._lock = threading.Lock()

    def path(self, sha256: str, device: str, profile: str) -> Path:
        """Where the package of one artifact × device × profile lives for this torch."""
        key = f"{sha256.lower()}-{device}-torch{torch.__version__}-{profile}"
        return self.directory / f"{_UNSAFE_KEY_CHARS.sub('_', key)}.pt2"

    def load_or_compile(
        self, sha256: str, device: str, profile: str, compile_to: Callable[[Path], None]
    ) -> tuple[Any, bool]:
        """The loaded package, compiling it first with `compile_to(path)` when it is not on
        disk; and whether it was (a cache hit)."""
        path = self.path(sha256, device, profile)
        # One compile per package at a time: two versions of one artifact must not race.
        with self._lock:
            hit = path.is_file()
            if not hit:
                self.directory.mkdir(parents=True, exist_ok=True)
                partial = path.with_suffix(f".partial-{threading.get_ident()}.pt2")
                compile_to(partial)
                partial.replace(path)
                self.misses += 1
            else:
                self.hits += 1
        runner = torch._inductor.aoti_load_package(str(path))
        log.info("compiled package %s %s (%s)", "reused" if hit else "written", path.name, device)
        return runner, hit


class Optimizer:
    """Applies profiles to loaded modules; the strategy the repository is given.

    Args:
        cache: Where compiled packages are kept; None: `compile` is refused.
    """

    def __init__(self, cache: CompileCache | None = None) -> None:
        self.cache = cache

    def apply(
        self,
        module: Any,
        *,
        profile: str,
        platform: str,
        device: str,
        sha256: str,
        exported: Callable[[], torch.export.ExportedProgram] | None = None,
        example_inputs: Sequence[torch.Tensor] = (),
        data: bytes = b"",
    ) -> tuple[Any, bool]:
        """The module with `profile` applied, and whether a compiled package was reused.
        Blocking (compiling takes seconds to minutes): run it in a thread.

        Args:
            module: The loaded (and cast) module.
            profile: One of `PROFILES`, already checked with `check_profile`.
            platform: The artifact's platform.
            device: The resolved device.
            sha256: The artifact's sha256 (the compile cache key).
            exported: Gives the artifact's ExportedProgram (`compile` only).
            example_inputs: Inputs shaped by the signature (`compile` only): AOTInductor
                needs them, and the loader never reads the pickled ones an archive carries.
            data: The verified TorchScript bytes (`int8_dynamic` only: quantised in a child).
        """
        if profile == "none":
            return module, False
        if profile == "int8_dynamic":
            return _quantize_in_child(data), False
        if profile == "freeze":
            frozen = module if not hasattr(module, "training") else torch.jit.freeze(module.eval())
            return torch.jit.optimize_for_inference(frozen), False
        if profile == "compile":
            if self.cache is None or exported is None:
                raise FailedPrecondition("optimization 'compile' needs the model server's compile cache")
            program = exported()

            def compile_to(path: Path) -> None:
                if device != "cpu":
                    moved = torch.export.passes.move_to_device_pass(program, device)
                else:
                    moved = program
                moved.example_inputs = (tuple(t.to(device) for t in example_inputs), {})
                torch._inductor.aoti_compile_and_package(moved, package_path=str(path))

            return self.cache.load_or_compile(sha256, device, profile, compile_to)
        raise FailedPrecondition(f"optimization {profile!r} is not valid; use one of {', '.join(PROFILES)}")


def report_for(
    *,
    profile: str,
    precision: str,
    device: str,
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    signature: tensor_pb2.Signature,
    baselines: Sequence[registry_pb2.InputBaseline],
    max_batch: int,
    load_s: float,
    compile_cache_hit: bool = False,
    sample_items: int = 256,
    budget_s: float = 0.3,
    batching: bool = True,
    reference_device: str = "",
) -> OptimizationReport:
    """Measure `candidate` against `reference` (fp32 eager, on `reference_device`; empty: on
    `device`) on a baseline sample of `sample_items` (at least `max_batch`) items, fed in
    chunks of `max_batch`; blocking."""
    items = max(sample_items, max_batch) if batching else 1
    inputs, kind = sample_inputs(signature, baselines, items)
    chunk = max_batch if batching else 1
    reference_out: list[list[torch.Tensor]] = []
    candidate_out: list[list[torch.Tensor]] = []
    with torch.inference_mode():
        for start in range(0, items, chunk):
            part = [t[start : start + chunk] for t in inputs] if batching else inputs
            reference_out.append(_flat_outputs(reference(*part)))
            candidate_out.append(_flat_outputs(candidate(*part)))
    joined_ref = [torch.cat(column) for column in zip(*reference_out, strict=True)]
    joined_cand = [torch.cat(column) for column in zip(*candidate_out, strict=True)]
    max_abs, max_rel, top1 = compare_outputs(joined_ref, joined_cand)
    one = [t[:1] for t in inputs] if batching else inputs
    top = [t[:max_batch] for t in inputs] if batching else inputs
    return OptimizationReport(
        profile=profile,
        precision=precision or "fp32",
        device=device,
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        top1_agreement=top1,
        items_per_s_batch1=items_per_s(candidate, one, budget_s=budget_s),
        items_per_s_max_batch=items_per_s(candidate, top, budget_s=budget_s),
        max_batch=max_batch if batching else 1,
        load_s=load_s,
        sample=kind,
        sample_items=items,
        compile_cache_hit=compile_cache_hit,
        reference_device=reference_device,
    )
