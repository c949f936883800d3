"""Round trips and refusals of the Open Inference Protocol codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelyard import oip_codec, tensor_codec
from modelyard.errors import SignatureMismatch
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.v1 import tensor_pb2


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.arange(6).reshape(shape) % 2 == 0
    if dtype.is_floating_point:
        return (torch.arange(6, dtype=torch.float32).reshape(shape) / 4 - 0.5).to(dtype)
    # Use each type's extreme values, to catch sign and width mistakes.
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        top = {torch.uint16: 2**16 - 1, torch.uint32: 2**32 - 1, torch.uint64: 2**64 - 1}[dtype]
        np_dtype = {torch.uint16: np.uint16, torch.uint32: np.uint32, torch.uint64: np.uint64}
        values = np.array([0, 1, 2, 3, top - 1, top], dtype=np_dtype[dtype])
        return torch.from_numpy(values).reshape(shape)
    info = torch.iinfo(dtype)
    return torch.tensor([info.min, -1 if info.min < 0 else 0, 0, 1, 2, info.max], dtype=dtype).reshape(shape)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.dtype == b.dtype and a.shape == b.shape
    return a.view(-1).view(torch.uint8).tolist() == b.contiguous().view(-1).view(torch.uint8).tolist()


@pytest.mark.parametrize("datatype", list(oip_codec.DTYPE_BY_DATATYPE))
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    tensor = _sample(oip_codec.DTYPE_BY_DATATYPE[datatype])
    response = oip.ModelInferResponse()
    oip_codec.encode_output(response, "y", tensor)
    out = response.outputs[0]
    assert (out.datatype, list(out.shape)) == (datatype, [2, 3])
    request = oip.ModelInferRequest(
        inputs=[oip.ModelInferRequest.InferInputTensor(name="y", datatype=datatype, shape=[2, 3])],
        raw_input_contents=list(response.raw_output_contents),
    )
    [(name, decoded)] = oip_codec.decode_inputs(request)
    assert name == "y"
    assert _equal(decoded, tensor)


@pytest.mark.parametrize(
    "datatype", [d for d in oip_codec.DTYPE_BY_DATATYPE if d in oip_codec.CONTENTS_FIELD_BY_DATATYPE]
)
def test_typed_round_trip(datatype: str) -> None:
    tensor = _sample(oip_codec.DTYPE_BY_DATATYPE[datatype])
    response = oip.ModelInferResponse()
    oip_codec.encode_output(response, "y", tensor, raw=False)
    assert not response.raw_output_contents
    out = response.outputs[0]
    field = oip_codec.CONTENTS_FIELD_BY_DATATYPE[datatype]
    assert len(getattr(out.contents, field)) == 6
    request = oip.ModelInferRequest(
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="y", datatype=datatype, shape=out.shape, contents=out.contents
            )
        ]
    )
    [(_, decoded)] = oip_codec.decode_inputs(request)
    assert _equal(decoded, tensor)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_types_go_raw_even_when_typed_is_asked(datatype: str) -> None:
    response = oip.ModelInferResponse()
    oip_codec.encode_output(response, "y", _sample(oip_codec.DTYPE_BY_DATATYPE[datatype]), raw=False)
    assert len(response.raw_output_contents) == 1


def test_raw_decode_shares_the_bytes() -> None:
    raw = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    tensor = oip_codec.decode_input(
        oip.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2, 2]), raw
    )
    assert tensor.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert tensor.untyped_storage().nbytes() == len(raw)


def test_empty_tensor_round_trips() -> None:
    response = oip.ModelInferResponse()
    oip_codec.encode_output(response, "y", torch.empty(0, 4))
    assert response.raw_output_contents[0] == b""
    decoded = oip_codec.decode_input(
        oip.ModelInferRequest.InferInputTensor(name="y", datatype="FP32", shape=[0, 4]), b""
    )
    assert decoded.shape == (0, 4)


def _input(name: str = "x", datatype: str = "FP32", shape: list[int] | None = None, **kw):
    return oip.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=[2] if shape is None else shape, **kw
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (
            oip.ModelInferRequest(inputs=[_input(datatype="FP33")], raw_input_contents=[b""]),
            "inputs[x].datatype",
        ),
        (
            oip.ModelInferRequest(inputs=[_input(datatype="BYTES")], raw_input_contents=[b""]),
            "inputs[x].datatype",
        ),
        (oip.ModelInferRequest(inputs=[_input(shape=[-1])], raw_input_contents=[b""]), "inputs[x].shape"),
        (oip.ModelInferRequest(inputs=[_input()], raw_input_contents=[b"\0" * 7]), "raw_input_contents[0]"),
        (
            oip.ModelInferRequest(inputs=[_input(), _input("z")], raw_input_contents=[b"\0" * 8]),
            "raw_input_contents",
        ),
        (oip.ModelInferRequest(inputs=[_input(), _input()], raw_input_contents=[b"\0" * 8] * 2), "inputs[x]"),
        (
            oip.ModelInferRequest(inputs=[_input(contents=oip.InferTensorContents(fp32_contents=[1.0]))]),
            "inputs[x].contents.fp32_contents",
        ),
        (oip.ModelInferRequest(inputs=[_input(datatype="FP16")]), "inputs[x].contents"),
        (
            oip.ModelInferRequest(
                inputs=[_input(datatype="INT8", contents=oip.InferTensorContents(int_contents=[1, 300]))]
            ),
            "inputs[x].contents.int_contents",
        ),
        (
            oip.ModelInferRequest(
                inputs=[_input(datatype="UINT8", contents=oip.InferTensorContents(uint_contents=[1, 256]))]
            ),
            "inputs[x].contents.uint_contents",
        ),
    ],
)
def test_bad_inputs_name_the_field(request_: oip.ModelInferRequest, field: str) -> None:
    with pytest.raises(SignatureMismatch) as caught:
        oip_codec.decode_inputs(request_)
    assert caught.value.field == field


def test_requested_outputs_select_and_order() -> None:
    request = oip.ModelInferRequest(
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in ("b", "a")]
    )
    names = oip_codec.requested_outputs(request)
    assert names == ["b", "a"]
    response = oip.ModelInferResponse()
    outputs = [("a", torch.zeros(1)), ("b", torch.ones(1)), ("c", torch.ones(2))]
    oip_codec.encode_outputs(response, outputs, requested=names)
    assert [o.name for o in response.outputs] == ["b", "a"]
    assert oip_codec.requested_outputs(oip.ModelInferRequest()) is None
    with pytest.raises(SignatureMismatch) as caught:
        oip_codec.encode_outputs(oip.ModelInferResponse(), outputs, requested=["nope"])
    assert caught.value.field == "outputs[nope]"


def test_raw_and_typed_outputs_never_mix() -> None:
    response = oip.ModelInferResponse()
    oip_codec.encode_output(response, "a", torch.zeros(1))
    with pytest.raises(ValueError):
        oip_codec.encode_output(response, "b", torch.zeros(1), raw=False)
    response = oip.ModelInferResponse()
    oip_codec.encode_output(response, "a", torch.zeros(1), raw=False)
    with pytest.raises(ValueError):
        oip_codec.encode_output(response, "b", torch.zeros(1))


def test_bytes_elements_round_trip_and_truncation_is_refused() -> None:
    items = [b"", b"hello", bytes(range(256))]
    raw = oip_codec.bytes_to_raw(items)
    assert oip_codec.bytes_from_raw(raw) == items
    with pytest.raises(SignatureMismatch):
        oip_codec.bytes_from_raw(raw[:-1])
    with pytest.raises(SignatureMismatch):
        oip_codec.bytes_from_raw(b"\x01\x00")


def test_datatype_tables_are_consistent() -> None:
    assert oip_codec.datatype_size("FP32") == 4
    assert oip_codec.datatype_size("BF16") == 2
    assert oip_codec.datatype_size("BYTES") is None
    for datatype, data_type in oip_codec.DATA_TYPE_BY_DATATYPE.items():
        assert oip_codec.DTYPE_BY_DATATYPE[datatype] == tensor_codec.DTYPE_BY_DATA_TYPE[data_type]


def test_gateway_pass_through_keeps_bytes_and_packs_typed() -> None:
    raw = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    request = oip.ModelInferRequest(
        inputs=[
            _input("a", shape=[2, 3]),
            _input("b", datatype="INT64", shape=[3]),
        ],
        raw_input_contents=[raw, torch.tensor([1, 2, 3]).numpy().tobytes()],
    )
    [a, b] = oip_codec.inputs_to_protos(request)
    assert (a.name, a.data_type, list(a.shape), a.raw) == ("a", tensor_pb2.DATA_TYPE_FP32, [2, 3], raw)
    assert b.data_type == tensor_pb2.DATA_TYPE_INT64
    typed = oip.ModelInferRequest(
        inputs=[_input("a", datatype="INT32", contents=oip.InferTensorContents(int_contents=[7, -7]))]
    )
    [t] = oip_codec.inputs_to_protos(typed)
    assert t.raw == torch.tensor([7, -7], dtype=torch.int32).numpy().tobytes()
    response = oip.ModelInferResponse()
    oip_codec.append_output_proto(response, a)
    assert (response.outputs[0].datatype, response.raw_output_contents[0]) == ("FP32", raw)
    for bad in ("UINT16", "BYTES"):
        with pytest.raises(SignatureMismatch):
            oip_codec.inputs_to_protos(
                oip.ModelInferRequest(inputs=[_input(datatype=bad)], raw_input_contents=[b"\0" * 16])
            )
    with pytest.raises(SignatureMismatch):
        oip_codec.inputs_to_protos(oip.ModelInferRequest(inputs=[_input()], raw_input_contents=[b"\0" * 4]))
    with pytest.raises(TypeError):
        oip_codec.append_output_proto(oip.ModelInferResponse(), tensor_pb2.Tensor(name="z"))
