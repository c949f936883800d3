"""Where and in which precision a loaded version runs, and its forward function per device.

`ServingConfig` is everything a deployment may override about how one version is served
(device, precision, batching). `forward_fn` turns a loaded module into the batcher's model
callable:

- CPU, fp32: the module itself (no wrapper, no copies).
- CPU, bf16: floating inputs are cast to bfloat16 and floating outputs back to their
  signature dtype (the module's parameters were cast once, at load).
- CUDA: each worker thread gets its own CUDA stream (so several instances overlap their
  copies and kernels); inputs go through pinned host memory with non-blocking host-to-device
  copies, outputs come back with non-blocking copies into pinned memory, and the thread waits
  on its own stream only. fp16/bf16 as on CPU, on the device.

The CUDA paths are guarded by `torch.cuda.is_available()`; where no GPU exists, a deployment
asking for one fails its load with a clear error instead of falling back silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_server.batching import BatchConfig
from model_server.optimization import Tolerance
from modelyard.errors import FailedPrecondition

__all__ = [
    "PRECISIONS",
    "ServingConfig",
    "available_devices",
    "resolve_device",
    "check_precision",
    "cast_module",
    "forward_fn",
]

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
"""Precision name -> the dtype floating parameters and activations are cast to (None: as saved)."""


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """How one loaded version is served; a change of any field reloads the version.

    Usage::

        ServingConfig(device="cuda:0", precision="fp16", batch=BatchConfig(max_batch_size=128))
    """

    device: str = "cpu"
    """"cpu", "cuda", "cuda:N" or "auto" (cuda if available)."""
    precision: str = "fp32"
    """"fp32", "fp16" (GPU only) or "bf16"."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimization: str = "none"
    """A `model_server.optimization.PROFILES` name, applied after the precision cast."""
    tolerance: Tolerance = field(default_factory=Tolerance)
    """How far a reduced precision or an optimisation may stray from fp32 eager."""


def available_devices() -> list[str]:
    """Every device this machine can run a version on: "cpu", then "cuda:N" per GPU."""
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return ["cpu", *cuda]


def resolve_device(device: str) -> str:
    """The concrete torch device string for a configured one.

    Raises:
        FailedPrecondition: an unknown device, or a CUDA device this machine does not have.
    """
    device = device.strip().lower()
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        index_text = device.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise FailedPrecondition(f"device {device!r} is not valid; use cpu, cuda, cuda:N or auto")
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {device!r} was asked for but this server has no CUDA device")
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise FailedPrecondition(
                f"device {device!r} was asked for but this server has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
        return f"cuda:{index}"
    raise FailedPrecondition(f"device {device!r} is not valid; use cpu, cuda, cuda:N or auto")


def check_precision(precision: str, device: str) -> torch.dtype | None:
    """The compute dtype for a precision on a resolved device (None: as saved).

    Raises:
        FailedPrecondition: an unknown precision, or fp16 on the CPU (slow there: use bf16).
    """
    if precision not in PRECISIONS:
        raise FailedPrecondition(f"precision {precision!r} is not valid; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device == "cpu":
        raise FailedPrecondition("precision fp16 runs on GPU only; use bf16 on the CPU")
    return PRECISIONS[precision]


def cast_module(module: Any, dtype: torch.dtype | None) -> Any:
    """Cast a module's floating parameters and buffers to `dtype` (in place); None: as is."""
    if dtype is None:
        return module
    cast = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
            cast += 1
    if cast == 0:
        # A frozen TorchScript module keeps its weights as graph constants, out of reach.
        raise FailedPrecondition(
            f"reduced precision needs the module's weights as parameters, and this one has none "
            f"(a frozen TorchScript module?); save it unfrozen to serve it in {dtype}"
        )
    return module


def _cast_in(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def forward_fn(
    module: Any, device: str, compute_dtype: torch.dtype | None, output_dtypes: Sequence[torch.dtype]
) -> Callable[..., Any]:
    """The batcher's model callable for `module` on a resolved device.

    Args:
        module: The loaded module (already on `device`, already cast to `compute_dtype`).
        device: "cpu" or "cuda:N".
        compute_dtype: The reduced precision dtype, or None for the saved precision.
        output_dtypes: The signature's output dtypes: reduced-precision outputs are cast back.
    """
    if device == "cpu":
        if compute_dtype is None:
            return module  # type: ignore[no-any-return]  # an nn.Module is the callable itself

        def cpu_forward(*inputs: torch.Tensor) -> Any:
            result = module(*(_cast_in(t, compute_dtype) for t in inputs))
            return _restore(result, output_dtypes)

        return cpu_forward
    return _CudaForward(module, torch.device(device), compute_dtype, output_dtypes)


def _restore(result: Any, output_dtypes: Sequence[torch.dtype]) -> Any:
    if isinstance(result, torch.Tensor):
        return result.to(output_dtypes[0]) if output_dtypes else result
    return type(result)(t.to(d) for t, d in zip(result, output_dtypes, strict=False))


class _CudaForward:
    """A module on a CUDA device, called from the batcher's worker threads.

    One CUDA stream per worker thread (a thread is an instance), created on first use.
    Host inputs are staged in pinned memory (from PyTorch's caching host allocator, so a
    steady batch size reuses the same blocks) and copied with non_blocking=True; outputs come
    back the same way, and the thread then waits for its own stream only.
    """

    def __init__(
        self,
        module: Any,
        device: torch.device,
        compute_dtype: torch.dtype | None,
        output_dtypes: Sequence[torch.dtype],
    ) -> None:
        self._module = module
        self._device = device
        self._compute_dtype = compute_dtype
        self._output_dtypes = list(output_dtypes)
        self._local = threading.local()

    def _stream(self) -> torch.cuda.Stream:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            # torch.cuda.Stream.__new__ is unannotated in torch's own sources.
            stream = torch.cuda.Stream(device=self._device)  # type: ignore[no-untyped-call]
            self._local.stream = stream
        return stream

    def __call__(self, *inputs: torch.Tensor) -> Any:
        stream = self._stream()
        with torch.cuda.stream(stream):
            # Kept referenced until the stream is synchronised: the copies read them.
            staged = []
            for tensor in inputs:
                if not tensor.is_pinned():
                    pinned_in = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                    pinned_in.copy_(tensor)
                    tensor = pinned_in
                staged.append(tensor)
            on_device = [_cast_in(t.to(self._device, non_blocking=True), self._compute_dtype) for t in staged]
            result = self._module(*on_device)
            single = isinstance(result, torch.Tensor)
            outputs = [result] if single else list(result)
            host = []
            for index, output in enumerate(outputs):
                if index < len(self._output_dtypes):
                    output = output.to(self._output_dtypes[index])
                pinned = torch.empty(output.shape, dtype=output.dtype, pin_memory=True)
                pinned.copy_(output, non_blocking=True)
                host.append(pinned)
        # Only this instance's work: other instances' streams keep running.
        stream.synchronize()
        return host[0] if single else tuple(host)
