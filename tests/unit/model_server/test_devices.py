"""Devices and precision: resolving device names, refusing what cannot run, casting, and the
forward functions (the CUDA one only where a GPU exists)."""

from __future__ import annotations

import pytest
import torch

from model_server.devices import cast_module, check_precision, forward_fn, resolve_device
from modelyard.errors import FailedPrecondition
from tests.unit.model_server.model_artifacts import mlp

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_names() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu"):
        with pytest.raises(FailedPrecondition):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="no CUDA device"):
            resolve_device("cuda")


def test_precisions() -> None:
    assert check_precision("fp32", "cpu") is None
    assert check_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(FailedPrecondition, match="GPU only"):
        check_precision("fp16", "cpu")
    with pytest.raises(FailedPrecondition):
        check_precision("int8", "cpu")


def test_bf16_forward_on_cpu_returns_the_signature_dtype_close_to_fp32() -> None:
    reference = mlp(3)
    module = cast_module(torch.jit.script(mlp(3)), torch.bfloat16)
    fn = forward_fn(module, "cpu", torch.bfloat16, [torch.float32])
    x = torch.randn(5, 4)
    with torch.inference_mode():
        out = fn(x)
        expected = reference(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)
    # fp32 on the CPU is the module itself: no wrapper on the hot path.
    plain = torch.jit.script(mlp(3))
    assert forward_fn(plain, "cpu", None, [torch.float32]) is plain


def test_a_frozen_module_cannot_be_cast() -> None:
    frozen = torch.jit.freeze(torch.jit.script(mlp(1)))
    with pytest.raises(FailedPrecondition, match="frozen"):
        cast_module(frozen, torch.bfloat16)
    assert cast_module(frozen, None) is frozen


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_forward_uses_pinned_memory_and_its_own_stream(precision: str) -> None:
    device = resolve_device("cuda")
    dtype = check_precision(precision, device)
    module = cast_module(torch.jit.script(mlp(2)).to(device), dtype)
    fn = forward_fn(module, device, dtype, [torch.float32])
    x = torch.randn(16, 4)
    with torch.inference_mode():
        out = fn(x)
        expected = mlp(2)(x)
    assert out.device.type == "cpu" and out.is_pinned() and out.dtype == torch.float32
    tolerance = 1e-5 if dtype is None else 0.05
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
