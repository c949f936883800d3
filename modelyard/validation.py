"""One validation of inference inputs for every service and both protocols. No grpc, no torch.

A request is checked in full against its version's signature before it may share work with
any other caller (a coalesced gateway call, a model server batch): names, data types, every
dimension, the byte length of every tensor, and the item count. The gateway and the model
server call the same `InputCheck.check`, so the same bad request gets the same answer from
either, whichever protocol it came in by (modelyard.v1 or the Open Inference Protocol).

Usage::

    check = InputCheck.from_proto("mlp", 3, signature)    # once, when a version is known
    ordered = check.check(inputs)                         # per request: WireTensors in
                                                          # signature order, or SignatureMismatch
    selected = check.select_outputs(["label"])           # output indices, or None for all

Echoed names are cut to `SHOWN_CHARS` characters: a caller's 1 MiB model name never comes
back in full (`shown`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from modelyard.errors import InvalidArgument, SignatureMismatch
from modelyard.v1 import tensor_pb2

__all__ = [
    "ITEMSIZE_BY_DATA_TYPE",
    "MAX_DIM",
    "MAX_ITEMS",
    "MAX_VERSION",
    "SHOWN_CHARS",
    "InputCheck",
    "TensorRule",
    "WireTensor",
    "data_type_name",
    "parse_version",
    "shown",
]

ITEMSIZE_BY_DATA_TYPE: dict[int, int] = {
    tensor_pb2.DATA_TYPE_BOOL: 1,
    tensor_pb2.DATA_TYPE_UINT8: 1,
    tensor_pb2.DATA_TYPE_INT8: 1,
    tensor_pb2.DATA_TYPE_INT16: 2,
    tensor_pb2.DATA_TYPE_INT32: 4,
    tensor_pb2.DATA_TYPE_INT64: 8,
    tensor_pb2.DATA_TYPE_FP16: 2,
    tensor_pb2.DATA_TYPE_BF16: 2,
    tensor_pb2.DATA_TYPE_FP32: 4,
    tensor_pb2.DATA_TYPE_FP64: 8,
}
"""Every data type a request may carry, with its bytes per element: the one table both
protocols accept (OIP datatypes without a counterpart here, UINT16/32/64 and BYTES, are
refused by both the gateway and the model servers)."""

MAX_ITEMS = 1 << 16
"""Most items (rows on dim 0 of a batching signature) one request may carry."""

MAX_DIM = (1 << 31) - 1
"""Largest size of any one dimension (a zero-element tensor could otherwise name any size)."""

MAX_VERSION = (1 << 63) - 1
"""Largest version number (int64 on the wire)."""

SHOWN_CHARS = 64
"""Most characters of a caller-chosen name echoed in an error message."""


def shown(name: str, limit: int = SHOWN_CHARS) -> str:
    """`name` quoted for an error message, cut to `limit` characters."""
    if len(name) <= limit:
        return repr(name)
    return repr(name[:limit]) + f"... ({len(name)} characters)"


def data_type_name(data_type: int) -> str:
    """The short name of a DataType value, such as "FP32"."""
    try:
        return tensor_pb2.DataType.Name(data_type).removeprefix("DATA_TYPE_")
    except ValueError:
        return f"<unknown {data_type}>"


def parse_version(text: str, *, field: str = "model_version") -> int | None:
    """A version number written as text (the OIP `model_version`): None for "", else a
    positive int64 of ASCII digits.

    Raises:
        InvalidArgument: anything else ("²", "-1", "1e3", 20 digits).
    """
    if text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_VERSION:
        raise InvalidArgument(
            f"model version {shown(text)} is not a version number (1 to {MAX_VERSION})", field=field
        )
    number = int(text)
    if number < 1:
        raise InvalidArgument("model version must be 1 or more", field=field)
    return number


class WireTensor(NamedTuple):
    """A tensor as it came on the wire, whichever protocol: nothing decoded yet."""

    name: str
    data_type: int
    """A `modelyard.v1.DataType` value."""
    shape: Sequence[int]
    raw: bytes
    """Row-major, little-endian elements."""

    @classmethod
    def of(cls, message: tensor_pb2.Tensor) -> WireTensor:
        return cls(message.name, message.data_type, message.shape, message.raw)


@dataclass(frozen=True, slots=True)
class TensorRule:
    """What one input of a signature takes."""

    name: str
    data_type: int
    shape: tuple[int, ...]
    """-1 matches any size."""
    itemsize: int


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class InputCheck:
    """The inputs of one model version, compiled from its signature for checking requests.

    Args:
        model: For messages.
        inputs: One rule per input, in signature order.
        outputs: The output names, in signature order.
        max_items: Most items one request may carry on dim 0.
    """

    model: str
    inputs: tuple[TensorRule, ...]
    outputs: tuple[str, ...]
    max_items: int = MAX_ITEMS
    _index: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {rule.name: i for i, rule in enumerate(self.inputs)})

    @property
    def batching(self) -> bool:
        """Whether every input has a batch dimension (-1 first)."""
        return bool(self.inputs) and all(r.shape and r.shape[0] == -1 for r in self.inputs)

    @classmethod
    def from_proto(cls, model: str, signature: tensor_pb2.Signature, **kwargs: Any) -> InputCheck:
        return cls._build(
            model,
            [(s.name, s.data_type, tuple(s.shape)) for s in signature.inputs],
            [s.name for s in signature.outputs],
            **kwargs,
        )

    @classmethod
    def from_json(cls, model: str, signature: Mapping[str, Any], **kwargs: Any) -> InputCheck:
        """From a signature in protobuf JSON (as membership records carry it)."""

        def data_type(spec: Mapping[str, Any]) -> int:
            value = spec.get("dataType", 0)
            return value if isinstance(value, int) else tensor_pb2.DataType.Value(value)

        return cls._build(
            model,
            [
                (s.get("name", ""), data_type(s), tuple(int(d) for d in s.get("shape", ())))
                for s in signature.get("inputs", ())
            ],
            [s.get("name", "") for s in signature.get("outputs", ())],
            **kwargs,
        )

    @classmethod
    def _build(
        cls,
        model: str,
        inputs: Sequence[tuple[str, int, tuple[int, ...]]],
        outputs: Sequence[str],
        **kwargs: Any,
    ) -> InputCheck:
        rules = tuple(
            TensorRule(name, data_type, shape, ITEMSIZE_BY_DATA_TYPE.get(data_type, 0))
            for name, data_type, shape in inputs
        )
        return cls(model, rules, tuple(outputs), **kwargs)

    def check(self, inputs: Sequence[WireTensor]) -> list[WireTensor]:
        """Check a request's inputs in full; return them in signature order.

        Checked in this order, the first fault reported (naming its field): each input's name
        (known, given once), data type, rank, every dimension (>= 0, <= `MAX_DIM`, equal to
        the signature's where it is fixed), byte length (= elements x element size); then
        every input present, and for a batching signature one item count on dim 0 for all
        inputs, from 1 to `max_items`.

        Raises:
            SignatureMismatch: the first fault found.
        """
        index = self._index
        rules = self.inputs
        slots: list[WireTensor | None] = [None] * len(rules)
        for tensor in inputs:
            name = tensor.name
            position = index.get(name)
            if position is None:
                raise SignatureMismatch(
                    f"unknown input {shown(name)}; model {shown(self.model)} takes "
                    f"{', '.join(repr(r.name) for r in rules)}",
                    field=f"inputs[{name[:SHOWN_CHARS]}]",
                )
            if slots[position] is not None:
                raise SignatureMismatch(f"input {name!r} is given twice", field=f"inputs[{name}]")
            rule = rules[position]
            if tensor.data_type != rule.data_type:
                raise SignatureMismatch(
                    f"input {name!r} must be {data_type_name(rule.data_type)}, got "
                    f"{data_type_name(tensor.data_type)}",
                    field=f"inputs[{name}].data_type",
                )
            shape = tensor.shape
            expected = rule.shape
            fits = len(shape) == len(expected)
            if fits:
                for d, e in zip(shape, expected, strict=True):
                    if d < 0 or d > MAX_DIM or (e != -1 and d != e):
                        fits = False
                        break
            if not fits:
                raise SignatureMismatch(
                    f"input {name!r} must have shape {_fmt_shape(expected)}, got {list(shape)[:8]}"
                    + ("..." if len(shape) > 8 else ""),
                    field=f"inputs[{name}].shape",
                )
            need = math.prod(shape) * rule.itemsize
            if len(tensor.raw) != need:
                raise SignatureMismatch(
                    f"input {name!r}: raw holds {len(tensor.raw)} bytes but shape {list(shape)} of "
                    f"{data_type_name(rule.data_type)} needs {need}",
                    field=f"inputs[{name}].raw",
                )
            slots[position] = tensor
        ordered: list[WireTensor] = []
        for rule, slot in zip(rules, slots, strict=True):
            if slot is None:
                raise SignatureMismatch(
                    f"input {rule.name!r} ({data_type_name(rule.data_type)}) is missing",
                    field=f"inputs[{rule.name}]",
                )
            ordered.append(slot)
        if self.batching:
            items = ordered[0].shape[0]
            for tensor in ordered:
                if tensor.shape[0] != items:
                    raise SignatureMismatch(
                        f"inputs disagree on the batch dimension: {ordered[0].name!r} has {items} "
                        f"items, {tensor.name!r} has {tensor.shape[0]}",
                        field=f"inputs[{tensor.name}].shape",
                    )
            if not 1 <= items <= self.max_items:
                raise SignatureMismatch(
                    f"a request carries 1 to {self.max_items} items on dim 0; this one has {items}",
                    field=f"inputs[{ordered[0].name}].shape",
                )
        return ordered

    def select_outputs(self, names: Sequence[str], field: str = "output_names") -> list[int] | None:
        """Indices of the asked outputs, in the order asked; None (all) when none is named.

        Args:
            names: The outputs asked for.
            field: The request field reported for an unknown name; "{name}" is replaced by
                it (the OIP names it "outputs[{name}]").

        Raises:
            InvalidArgument: a name the model does not return.
        """
        if not names:
            return None
        outputs = self.outputs
        selected: list[int] = []
        for name in names:
            try:
                position = outputs.index(name)
            except ValueError:
                raise InvalidArgument(
                    f"unknown output {shown(name)}; model {shown(self.model)} returns "
                    f"{', '.join(repr(n) for n in outputs)}",
                    field=field.replace("{name}", name[:SHOWN_CHARS]),
                ) from None
            selected.append(position)
        return selected
