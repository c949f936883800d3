"""Open Inference Protocol (KServe v2 / Triton) tensors <-> torch tensors and our `Tensor`.

Pure functions over the generated `modelyard.oip` messages; no grpc, no I/O. Used by the model
server's OIP servicer and by the gateway's OIP endpoint.

Wire rules (KServe v2 gRPC, as Triton implements them):

- A tensor's datatype is a string ("FP32", "INT64", "BYTES", ...). `DTYPE_BY_DATATYPE` maps
  every numeric datatype to its torch dtype; BYTES has no torch dtype and travels as a list of
  `bytes` (`bytes_from_raw` / `bytes_to_raw`).
- Input data comes either in `raw_input_contents` (one entry per input, same order, row-major,
  little-endian; BYTES elements each prefixed by a 4-byte little-endian length) or in each
  input's typed `contents` (`bool_contents`, `int_contents`, ...; see `CONTENTS_FIELD_BY_DATATYPE`).
  A request uses one form for all of its inputs. FP16 and BF16 have no typed field: raw only.
- Outputs are answered in `raw_output_contents` by default (what tritonclient and perf_analyzer
  read), or in typed contents when asked (`raw=False`).

Usage, model server side (torch in, torch out)::

    inputs = decode_inputs(request)              # list[(name, torch.Tensor)], zero-copy for raw
    outputs = run_model(dict(inputs))
    response = grpc_service_pb2.ModelInferResponse(model_name=..., model_version=..., id=request.id)
    encode_outputs(response, outputs.items(), requested=requested_outputs(request))

Usage, gateway side (never decode tensor bytes; pass them through as `modelyard.v1.Tensor`)::

    tensors = inputs_to_protos(request)          # list[tensor_pb2.Tensor]; raw bytes shared
    ...forward, get tensor_pb2.Tensor outputs back...
    for t in outputs:
        append_output_proto(response, t)         # raw bytes shared again

Errors are `modelyard.errors.SignatureMismatch` (INVALID_ARGUMENT) naming the field at fault,
such as ``inputs[x].datatype`` or ``raw_input_contents[1]``.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch

from modelyard import tensor_codec
from modelyard.errors import SignatureMismatch
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.v1 import tensor_pb2
from modelyard.validation import MAX_DIM, SHOWN_CHARS, WireTensor, shown

__all__ = [
    "DTYPE_BY_DATATYPE",
    "DATATYPE_BY_DTYPE",
    "DATA_TYPE_BY_DATATYPE",
    "DATATYPE_BY_DATA_TYPE",
    "CONTENTS_FIELD_BY_DATATYPE",
    "datatype_size",
    "decode_input",
    "decode_inputs",
    "wire_inputs",
    "oip_platform",
    "requested_outputs",
    "encode_output",
    "encode_outputs",
    "tensor_to_raw",
    "bytes_from_raw",
    "bytes_to_raw",
    "inputs_to_protos",
    "append_output_proto",
]

assert sys.byteorder == "little", "the OIP codec assumes a little-endian host"

# cast: the enum wrapper's items() is typed with plain ints; they are DataType values.
DATA_TYPE_BY_DATATYPE = cast(
    "dict[str, tensor_pb2.DataType]",
    {
        name.removeprefix("DATA_TYPE_"): value
        for name, value in tensor_pb2.DataType.items()
        if value != tensor_pb2.DATA_TYPE_UNSPECIFIED
    },
)
"""OIP datatype name -> `modelyard.v1.DataType`: the datatypes a Modelyard cluster accepts,
on the gateway and on every model server alike (the names match; OIP's UINT16/32/64 and BYTES
have no counterpart in our contract and are refused everywhere)."""

DATATYPE_BY_DATA_TYPE: dict[int, str] = {v: k for k, v in DATA_TYPE_BY_DATATYPE.items()}
"""`modelyard.v1.DataType` -> OIP datatype name."""

DTYPE_BY_DATATYPE: dict[str, torch.dtype] = {
    name: tensor_codec.DTYPE_BY_DATA_TYPE[data_type] for name, data_type in DATA_TYPE_BY_DATATYPE.items()
}
"""OIP datatype name -> torch dtype, for every accepted datatype (derived: one table)."""

DATATYPE_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_BY_DATATYPE.items()}
"""torch dtype -> OIP datatype name."""

PLATFORM_BY_FORMAT_NAME: dict[str, str] = {
    "torchscript": "pytorch_torchscript",
    "torch_export": "pytorch_torch_export",
}
"""Our artifact format -> the platform ModelMetadata reports: the OIP spec's name for
TorchScript; the spec names no platform for torch.export, so ours follows its pattern."""


def oip_platform(platform: str) -> str:
    """The OIP ModelMetadata platform of a version served as `platform` ("torchscript", ...)."""
    return PLATFORM_BY_FORMAT_NAME.get(platform, f"pytorch_{platform}")


CONTENTS_FIELD_BY_DATATYPE: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
"""OIP datatype name -> the `InferTensorContents` field that carries it typed (FP16/BF16: none)."""

# numpy twins for building tensors from typed contents.
_NUMPY_BY_DATATYPE: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
}

_LENGTH = struct.Struct("<I")


def datatype_size(datatype: str) -> int | None:
    """Bytes per element of a numeric datatype; None for BYTES or an unknown name."""
    dtype = DTYPE_BY_DATATYPE.get(datatype)
    return None if dtype is None else dtype.itemsize


def _shape_of(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    for d in shape:
        if 0 <= d <= MAX_DIM:
            continue
        raise SignatureMismatch(
            f"input {shown(name)}: every dimension must lie between 0 and {MAX_DIM}, got {list(shape)[:8]}",
            field=f"inputs[{name[:SHOWN_CHARS]}].shape",
        )
    return shape


def _dtype_of(name: str, datatype: str) -> torch.dtype:
    dtype = DTYPE_BY_DATATYPE.get(datatype)
    if dtype is None:
        known = ", ".join(DTYPE_BY_DATATYPE)
        raise SignatureMismatch(
            f"input {shown(name)}: datatype {shown(datatype)} is not supported; use one of {known}",
            field=f"inputs[{name[:SHOWN_CHARS]}].datatype",
        )
    return dtype


def decode_input(
    tensor: oip.ModelInferRequest.InferInputTensor, raw: bytes | None = None, *, index: int = 0
) -> torch.Tensor:
    """Decode one OIP input into a torch tensor.

    Args:
        tensor: The input's description (name, datatype, shape, and typed contents when `raw`
            is None).
        raw: Its entry of `raw_input_contents`, if the request carries raw contents. Shared,
            not copied: the result is a read-only-in-spirit view of these bytes.
        index: Its position in `raw_input_contents`, for error messages.

    Raises:
        SignatureMismatch: unknown or non-numeric datatype, a negative dimension, or data whose
            size does not match the shape.
    """
    name = tensor.name
    dtype = _dtype_of(name, tensor.datatype)
    shape = _shape_of(name, tensor.shape)
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise SignatureMismatch(
                f"input {name!r}: raw_input_contents[{index}] holds {len(raw)} bytes but shape "
                f"{list(shape)} of {tensor.datatype} needs {count * dtype.itemsize}",
                field=f"raw_input_contents[{index}]",
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).view(shape)
    field = CONTENTS_FIELD_BY_DATATYPE.get(tensor.datatype)
    if field is None:
        raise SignatureMismatch(
            f"input {name!r}: {tensor.datatype} has no typed contents; send raw_input_contents",
            field=f"inputs[{name}].contents",
        )
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise SignatureMismatch(
            f"input {name!r}: contents.{field} holds {len(values)} elements but shape "
            f"{list(shape)} needs {count}",
            field=f"inputs[{name}].contents.{field}",
        )
    np_dtype = _NUMPY_BY_DATATYPE[tensor.datatype]
    array: np.ndarray[Any, Any]
    if field in ("int_contents", "uint_contents"):
        # These fields are 32-bit on the wire: a value outside a narrower datatype's range
        # would wrap silently in a cast; refuse it instead.
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(np_dtype)
        if count and (wide.min() < info.min or wide.max() > info.max):
            raise SignatureMismatch(
                f"input {name!r}: contents.{field} has values outside {tensor.datatype}",
                field=f"inputs[{name}].contents.{field}",
            )
        array = wide.astype(np_dtype)
    else:
        array = np.array(values, dtype=np_dtype)
    return torch.from_numpy(array).view(shape)


def decode_inputs(request: oip.ModelInferRequest) -> list[tuple[str, torch.Tensor]]:
    """Decode every input of a ModelInferRequest into torch, in request order (a convenience
    for tools and tests; the services check `wire_inputs` against the signature first).

    Raises:
        SignatureMismatch: see `wire_inputs`; also a duplicated input name.
    """
    decoded: list[tuple[str, torch.Tensor]] = []
    seen: set[str] = set()
    for tensor in wire_inputs(request):
        if tensor.name in seen:
            raise SignatureMismatch(f"input {tensor.name!r} appears twice", field=f"inputs[{tensor.name}]")
        seen.add(tensor.name)
        decoded.append((tensor.name, tensor_codec.tensor_from_wire(tensor)))
    return decoded


def requested_outputs(request: oip.ModelInferRequest) -> list[str] | None:
    """The output names the request asks for, in order; None means every output."""
    return [o.name for o in request.outputs] or None


_NUMPY_DTYPES = frozenset(
    {
        torch.float16,
        torch.float32,
        torch.float64,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
    }
)
"""Dtypes whose tensors `.numpy()` takes as they are (not bfloat16, nor bool: uint8 views)."""


def tensor_to_raw(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as row-major little-endian bytes (one copy; any device/layout)."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES and tensor.is_contiguous():
        # The common case (a row slice of a CPU batch): numpy reads the memory in place.
        return tensor.detach().numpy().tobytes()
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    # A uint8 view of the storage works for every dtype, bfloat16 and bool included.
    return t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def encode_output(
    response: oip.ModelInferResponse, name: str, tensor: torch.Tensor, *, raw: bool = True
) -> None:
    """Append one torch tensor to a ModelInferResponse.

    Args:
        response: The response to append to (`outputs`, and `raw_output_contents` if raw).
        name: The output's name.
        tensor: Any dtype in `DATATYPE_BY_DTYPE`, any device.
        raw: Put the data in `raw_output_contents` (default) instead of typed contents.
            FP16/BF16 are always raw (they have no typed field).

    Raises:
        TypeError: the tensor's dtype has no OIP datatype (a model bug, not a caller's).
        ValueError: typed output requested while earlier outputs went raw, or the reverse
            (OIP allows one form per response).
    """
    datatype = DATATYPE_BY_DTYPE.get(tensor.dtype)
    if datatype is None:
        raise TypeError(f"output {name!r} has dtype {tensor.dtype}, which OIP cannot carry")
    field = CONTENTS_FIELD_BY_DATATYPE.get(datatype)
    use_raw = raw or field is None
    if use_raw and len(response.raw_output_contents) != len(response.outputs):
        raise ValueError("cannot mix raw and typed outputs in one response")
    if not use_raw and response.raw_output_contents:
        raise ValueError("cannot mix raw and typed outputs in one response")
    out = response.outputs.add(name=name, datatype=datatype, shape=tensor.shape)
    if use_raw:
        response.raw_output_contents.append(tensor_to_raw(tensor))
    else:
        assert field is not None
        getattr(out.contents, field).extend(tensor.detach().cpu().reshape(-1).tolist())


def encode_outputs(
    response: oip.ModelInferResponse,
    outputs: Iterable[tuple[str, torch.Tensor]],
    *,
    requested: Sequence[str] | None = None,
    raw: bool = True,
) -> None:
    """Append a model's outputs to a ModelInferResponse.

    Args:
        response: The response to fill.
        outputs: (name, tensor) pairs, in the model's order.
        requested: Only these outputs, in this order (from `requested_outputs`); None: all.
        raw: See `encode_output`.

    Raises:
        SignatureMismatch: a requested output the model does not produce.
    """
    if requested is None:
        for name, tensor in outputs:
            encode_output(response, name, tensor, raw=raw)
        return
    by_name = dict(outputs)
    for name in requested:
        found = by_name.get(name)
        if found is None:
            raise SignatureMismatch(
                f"output {name!r} is not an output of this model; it has {sorted(by_name)}",
                field=f"outputs[{name}]",
            )
        encode_output(response, name, found, raw=raw)


def bytes_from_raw(raw: bytes) -> list[bytes]:
    """Split a raw BYTES tensor (each element: 4-byte little-endian length, then the bytes).

    Raises:
        SignatureMismatch: the lengths run past the end of the buffer.
    """
    items: list[bytes] = []
    view = memoryview(raw)
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise SignatureMismatch("BYTES element length is truncated", field="raw_input_contents")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise SignatureMismatch("BYTES element runs past the buffer", field="raw_input_contents")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def bytes_to_raw(items: Iterable[bytes]) -> bytes:
    """Pack BYTES elements into the raw form (each: 4-byte little-endian length, then bytes)."""
    parts: list[bytes] = []
    for item in items:
        parts.append(_LENGTH.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def wire_inputs(request: oip.ModelInferRequest) -> list[WireTensor]:
    """The inputs of a ModelInferRequest as wire tensors, in request order, for
    `modelyard.validation.InputCheck`. The gateway and the model servers both translate OIP
    requests here, so they accept and refuse the same requests.

    Raw contents pass through as they are; typed contents are packed once into raw bytes.

    Raises:
        SignatureMismatch: a raw_input_contents count that does not match the inputs, typed
            `contents` set beside raw_input_contents (the spec forbids both), a datatype our
            contract cannot carry (UINT16/32/64, BYTES), a dimension below 0 or above
            `MAX_DIM`, raw bytes that do not match the shape, or typed contents of the wrong
            length or range.
    """
    inputs = request.inputs
    raws = request.raw_input_contents
    if raws:
        if len(raws) != len(inputs):
            raise SignatureMismatch(
                f"raw_input_contents has {len(raws)} entries for {len(inputs)} inputs; send one "
                "per input, in the same order",
                field="raw_input_contents",
            )
        for tensor in inputs:
            if tensor.HasField("contents"):
                raise SignatureMismatch(
                    f"input {shown(tensor.name)}: contents must not be set when "
                    "raw_input_contents is used; send each input one way",
                    field=f"inputs[{tensor.name[:SHOWN_CHARS]}].contents",
                )
    tensors: list[WireTensor] = []
    for i, tensor in enumerate(inputs):
        data_type = DATA_TYPE_BY_DATATYPE.get(tensor.datatype)
        if data_type is None:
            _dtype_of(tensor.name, tensor.datatype)  # raises, naming the accepted datatypes
            raise AssertionError("unreachable")
        shape = _shape_of(tensor.name, tensor.shape)
        if raws:
            raw = raws[i]
            need = math.prod(shape) * DTYPE_BY_DATATYPE[tensor.datatype].itemsize
            if len(raw) != need:
                raise SignatureMismatch(
                    f"input {shown(tensor.name)}: raw_input_contents[{i}] holds {len(raw)} bytes "
                    f"but shape {list(shape)} of {tensor.datatype} needs {need}",
                    field=f"raw_input_contents[{i}]",
                )
        else:
            raw = tensor_to_raw(decode_input(tensor, None, index=i))
        tensors.append(WireTensor(tensor.name, data_type, shape, raw))
    return tensors


def inputs_to_protos(request: oip.ModelInferRequest) -> list[tensor_pb2.Tensor]:
    """The inputs of a ModelInferRequest as `modelyard.v1.Tensor`s, never decoded into torch
    (the gateway's translation; see `wire_inputs`)."""
    return [
        tensor_pb2.Tensor(name=t.name, data_type=t.data_type, shape=t.shape, raw=t.raw)  # type: ignore[arg-type]  # a DataType value
        for t in wire_inputs(request)
    ]


def append_output_proto(response: oip.ModelInferResponse, tensor: tensor_pb2.Tensor) -> None:
    """Append a `modelyard.v1.Tensor` to a ModelInferResponse as a raw output (bytes shared).

    Raises:
        TypeError: the tensor's data_type is unspecified or unknown.
    """
    datatype = DATATYPE_BY_DATA_TYPE.get(tensor.data_type)
    if datatype is None:
        raise TypeError(
            f"output {tensor.name!r} has data_type "
            f"{tensor_codec.data_type_name(tensor.data_type)}, which OIP cannot carry"
        )
    response.outputs.add(name=tensor.name, datatype=datatype, shape=tensor.shape)
    response.raw_output_contents.append(tensor.raw)
