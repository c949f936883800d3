"""Round trips of every contract dtype through the codec, and the errors for bad tensors."""

from __future__ import annotations

import pytest
import torch

from modelyard.errors import SignatureMismatch
from modelyard.tensor_codec import (
    DTYPE_BY_DATA_TYPE,
    check_tensor,
    tensor_from_proto,
    tensor_to_proto,
)
from modelyard.v1 import tensor_pb2


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


@pytest.mark.parametrize("data_type,dtype", sorted(DTYPE_BY_DATA_TYPE.items()))
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (2, 3, 4)])
def test_round_trip_is_exact(data_type: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    original = _sample(dtype, shape)
    message = tensor_to_proto("x", original)
    assert message.data_type == data_type
    assert list(message.shape) == list(shape)
    assert len(message.raw) == original.numel() * dtype.itemsize
    decoded = tensor_from_proto(tensor_pb2.Tensor.FromString(message.SerializeToString()))
    assert decoded.dtype == dtype
    assert decoded.shape == original.shape
    assert torch.equal(decoded, original)


def test_encoding_is_little_endian_row_major() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16)
    assert tensor_to_proto("x", t).raw == bytes([1, 0, 2, 0, 3, 0, 4, 0])
    # A transposed (non-contiguous) view is written in its logical row-major order.
    assert tensor_to_proto("x", t.t()).raw == bytes([1, 0, 3, 0, 2, 0, 4, 0])


def test_decoding_shares_the_message_bytes() -> None:
    message = tensor_to_proto("x", torch.arange(6, dtype=torch.float32))
    raw = message.raw
    decoded = tensor_from_proto(
        tensor_pb2.Tensor(name="x", data_type=message.data_type, shape=[2, 3], raw=raw)
    )
    assert decoded.shape == (2, 3)
    assert decoded.untyped_storage().nbytes() == len(raw)


def test_wrong_byte_count_names_the_field() -> None:
    bad = tensor_pb2.Tensor(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[2, 3], raw=bytes(20))
    with pytest.raises(SignatureMismatch, match="needs 24") as info:
        tensor_from_proto(bad)
    assert info.value.field == "inputs[input].raw"


def test_unspecified_dtype_is_rejected() -> None:
    with pytest.raises(SignatureMismatch, match="UNSPECIFIED is not supported"):
        tensor_from_proto(tensor_pb2.Tensor(name="input", shape=[1], raw=bytes(4)))


def test_negative_dimension_is_rejected() -> None:
    bad = tensor_pb2.Tensor(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1])
    with pytest.raises(SignatureMismatch, match="negative"):
        tensor_from_proto(bad)


def test_check_tensor_accepts_dynamic_dims_and_rejects_mismatches() -> None:
    fp32 = tensor_pb2.DATA_TYPE_FP32
    check_tensor("input", torch.zeros(7, 64), fp32, [-1, 64])
    with pytest.raises(SignatureMismatch, match=r"shape \[N, 64\], got \[7, 63\]"):
        check_tensor("input", torch.zeros(7, 63), fp32, [-1, 64])
    with pytest.raises(SignatureMismatch, match="must be FP32, got FP64"):
        check_tensor("input", torch.zeros(7, 64, dtype=torch.float64), fp32, [-1, 64])
    with pytest.raises(SignatureMismatch, match="shape"):
        check_tensor("input", torch.zeros(64), fp32, [-1, 64])
