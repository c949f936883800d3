"""Conversions between the wire `Tensor` and `torch.Tensor`, as tables plus pure functions.

Decoding is zero-copy: `torch.frombuffer` views the message's bytes directly (the tensor is
read-only in spirit; nothing in the serving path writes to an input). Encoding copies once,
from the tensor's storage into the message's `raw` bytes.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Sequence

import torch

from modelyard.errors import SignatureMismatch
from modelyard.v1 import tensor_pb2
from modelyard.validation import ITEMSIZE_BY_DATA_TYPE, WireTensor, data_type_name

__all__ = [
    "DTYPE_BY_DATA_TYPE",
    "DATA_TYPE_BY_DTYPE",
    "data_type_name",
    "tensor_from_proto",
    "tensor_from_wire",
    "tensor_to_proto",
    "check_tensor",
]

DataType = tensor_pb2.DataType

DTYPE_BY_DATA_TYPE: dict[DataType, torch.dtype] = {
    tensor_pb2.DATA_TYPE_BOOL: torch.bool,
    tensor_pb2.DATA_TYPE_UINT8: torch.uint8,
    tensor_pb2.DATA_TYPE_INT8: torch.int8,
    tensor_pb2.DATA_TYPE_INT16: torch.int16,
    tensor_pb2.DATA_TYPE_INT32: torch.int32,
    tensor_pb2.DATA_TYPE_INT64: torch.int64,
    tensor_pb2.DATA_TYPE_FP16: torch.float16,
    tensor_pb2.DATA_TYPE_BF16: torch.bfloat16,
    tensor_pb2.DATA_TYPE_FP32: torch.float32,
    tensor_pb2.DATA_TYPE_FP64: torch.float64,
}
DATA_TYPE_BY_DTYPE: dict[torch.dtype, DataType] = {v: k for k, v in DTYPE_BY_DATA_TYPE.items()}
assert {k: v.itemsize for k, v in DTYPE_BY_DATA_TYPE.items()} == ITEMSIZE_BY_DATA_TYPE, "one table"

# The wire format is little-endian; so is every platform torch ships for. Refuse to run
# silently wrong rather than byte-swap on the hot path.
assert sys.byteorder == "little", "Modelyard's tensor codec assumes a little-endian host"


def tensor_from_proto(message: tensor_pb2.Tensor) -> torch.Tensor:
    """Decode a wire tensor into a torch tensor that shares the message's bytes.

    Raises:
        SignatureMismatch: the dtype is unknown or the bytes do not match the shape.
    """
    dtype = DTYPE_BY_DATA_TYPE.get(message.data_type)
    if dtype is None:
        raise SignatureMismatch(
            f"tensor {message.name!r}: data_type {data_type_name(message.data_type)} is not "
            f"supported; use one of {', '.join(data_type_name(d) for d in DTYPE_BY_DATA_TYPE)}",
            field=f"inputs[{message.name}].data_type",
        )
    shape = tuple(message.shape)
    if any(d < 0 for d in shape):
        raise SignatureMismatch(
            f"tensor {message.name!r}: shape {list(shape)} has a negative dimension",
            field=f"inputs[{message.name}].shape",
        )
    count = math.prod(shape)
    itemsize = dtype.itemsize
    raw = message.raw
    if len(raw) != count * itemsize:
        raise SignatureMismatch(
            f"tensor {message.name!r}: raw holds {len(raw)} bytes but shape {list(shape)} of "
            f"{data_type_name(message.data_type)} needs {count * itemsize}",
            field=f"inputs[{message.name}].raw",
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).view(shape)


def tensor_from_wire(tensor: WireTensor) -> torch.Tensor:
    """A wire tensor already checked (`modelyard.validation.InputCheck`, or its raw size
    checked against its shape) as a torch tensor sharing its bytes."""
    dtype = DTYPE_BY_DATA_TYPE[tensor.data_type]  # type: ignore[index]  # checked: a known value
    shape = tuple(tensor.shape)
    if not tensor.raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(tensor.raw, dtype=dtype).view(shape)


def tensor_to_proto(name: str, tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a torch tensor (any device, any layout) as a wire tensor."""
    data_type = DATA_TYPE_BY_DTYPE.get(tensor.dtype)
    if data_type is None:
        raise TypeError(f"output {name!r} has dtype {tensor.dtype}, which the contract cannot carry")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # A byte view of the storage; bfloat16 and bool have no numpy equivalent, uint8 does.
    raw = t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tensor_pb2.Tensor(name=name, data_type=data_type, shape=t.shape, raw=raw)


def check_tensor(name: str, tensor: torch.Tensor, data_type: DataType, shape: Sequence[int]) -> None:
    """Check a decoded input against its TensorSpec (-1 matches any size).

    Raises:
        SignatureMismatch: naming the field at fault and what was expected.
    """
    expected = DTYPE_BY_DATA_TYPE.get(data_type)
    if expected is not None and tensor.dtype != expected:
        raise SignatureMismatch(
            f"input {name!r} must be {data_type_name(data_type)}, got "
            f"{data_type_name(DATA_TYPE_BY_DTYPE[tensor.dtype])}",
            field=f"inputs[{name}].data_type",
        )
    if not _shape_matches(tensor.shape, shape):
        raise SignatureMismatch(
            f"input {name!r} must have shape {_fmt_shape(shape)}, got {list(tensor.shape)}",
            field=f"inputs[{name}].shape",
        )


def _shape_matches(actual: Iterable[int], expected: Sequence[int]) -> bool:
    actual = tuple(actual)
    return len(actual) == len(expected) and all(
        e == -1 or a == e for a, e in zip(actual, expected, strict=True)
    )


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def _silence_readonly_buffer_warning() -> None:
    # torch.frombuffer warns (once per process) that `bytes` is read-only. Decoding shares the
    # message's bytes on purpose and nothing in the serving path writes to an input, so the
    # warning is spent here, at import, instead of on the first request.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(bytes(4), dtype=torch.uint8)


_silence_readonly_buffer_warning()
