"""Hostile and careless callers against a real gateway and model server (Redis, port 0, real
TorchScript models), with coalescing and batching on: no malformed call may fail, change or
read a valid caller's answer; every client mistake gets a precise status, never UNKNOWN or
INTERNAL; the servers stay up with flat memory and bounded metrics.

Every valid answer is checked against in-process torch. Fuzzing is seeded and bounded.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from gateway.app import GatewayApp
from model_server.app import ModelServerApp
from modelyard.coordination import CoordinationStore
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import tensor_pb2
from tests.integration.conftest import ClusterSource, LaunchGateway, LaunchModelServer, converge

pytestmark = pytest.mark.integration

FP32, INT64 = tensor_pb2.DATA_TYPE_FP32, tensor_pb2.DATA_TYPE_INT64
VOCABULARY = 100

PREDICT = "/modelyard.v1.InferenceService/Predict"
METADATA = "/modelyard.v1.InferenceService/GetModelMetadata"
INFER = "/modelyard.v1.ModelServerService/Infer"
OIP_INFER = "/inference.GRPCInferenceService/ModelInfer"
OIP_METADATA = "/inference.GRPCInferenceService/ModelMetadata"
OIP_READY = "/inference.GRPCInferenceService/ModelReady"

CLIENT_STATUSES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,  # a mutation naming a version that is deployed but not ready
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""What a mutated request may get; UNKNOWN and INTERNAL are server faults."""


def signature(inputs: list[tuple[str, int, list[int]]], outputs: list[tuple[str, int, list[int]]]) -> Any:
    return tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name=n, data_type=d, shape=s) for n, d, s in inputs],
        outputs=[tensor_pb2.TensorSpec(name=n, data_type=d, shape=s) for n, d, s in outputs],
    )


class Embed(torch.nn.Module):
    """Token ids [N, 4] -> mean embedding [N, 8]; an id past the vocabulary raises."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(VOCABULARY, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids).mean(dim=1)


@dataclass
class Cluster:
    gateway: GatewayApp
    model_server: ModelServerApp
    source: ClusterSource
    gateway_channel: grpc.aio.Channel
    server_channel: grpc.aio.Channel

    def raw(self, method: str, *, direct: bool = False) -> Any:
        """A bytes-in, bytes-out callable for any method."""
        channel = self.server_channel if direct else self.gateway_channel
        return channel.unary_unary(method)


@pytest.fixture
async def cluster(
    cluster_source: ClusterSource,
    launch_model_server: LaunchModelServer,
    launch_gateway: LaunchGateway,
    store: CoordinationStore,
) -> AsyncIterator[Cluster]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    cluster_source.add(
        "mlp", 1, torch.jit.script(mlp), signature([("input", FP32, [-1, 64])], [("output", FP32, [-1, 10])])
    )
    cluster_source.add(
        "embed",
        1,
        torch.jit.script(Embed().eval()),
        signature([("ids", INT64, [-1, 4])], [("embedding", FP32, [-1, 8])]),
    )
    await store.apply_aliases("mlp", {"production": 1}, 1)
    await store.apply_aliases("embed", {"production": 1}, 1)
    # A window long enough that concurrent callers share batches on a busy machine.
    model_server = await launch_model_server(max_batch_size=64, max_queue_delay_ms=5.0, execution="thread")
    gateway = await launch_gateway(coalesce_enabled=True, coalesce_max_in_flight=1)
    await converge(lambda: {("mlp", 1), ("embed", 1)} <= set(gateway.dataplane.table.replicas))
    async with (
        grpc.aio.insecure_channel(gateway.address) as gateway_channel,
        grpc.aio.insecure_channel(model_server.address) as server_channel,
    ):
        yield Cluster(gateway, model_server, cluster_source, gateway_channel, server_channel)


def predict_request(x: torch.Tensor, *, model: str = "mlp", name: str = "input", **fields: Any) -> Any:
    return inf.PredictRequest(model=model, inputs=[tensor_to_proto(name, x)], **fields)


def tensor(name: str, data_type: int, shape: list[int], raw: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=name, data_type=data_type, shape=shape, raw=raw)  # type: ignore[arg-type]


def reason_of(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)  # type: ignore[arg-type]
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


async def status_of(call: Callable[[bytes], Any], request: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    try:
        answer = await call(request, timeout=10)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or "", b""
    return grpc.StatusCode.OK, "", answer


def hostile_predicts() -> list[tuple[str, Any]]:
    """Malformed PredictRequests for the [N, 64] FP32 model, each with what it breaks."""
    row = torch.randn(1, 64)
    good = tensor_to_proto("input", row)
    return [
        (
            "twice the bytes",
            inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [1, 64], good.raw * 2)]),
        ),
        ("no bytes", inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [1, 64], b"")])),
        (
            "three bytes short",
            inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [1, 64], good.raw[:-3])]),
        ),
        ("rows short", inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [2, 64], good.raw)])),
        (
            "wrong dtype",
            inf.PredictRequest(
                model="mlp", inputs=[tensor("input", tensor_pb2.DATA_TYPE_FP64, [1, 32], good.raw)]
            ),
        ),
        ("unknown dtype", inf.PredictRequest(model="mlp", inputs=[tensor("input", 99, [1, 64], good.raw)])),
        (
            "wrong width",
            inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [1, 65], good.raw + b"\0" * 4)]),
        ),
        ("negative dim", inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [-1, 64], good.raw)])),
        ("zero items", inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [0, 64], b"")])),
        ("huge empty", inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [1 << 40, 0], b"")])),
        ("rank", inf.PredictRequest(model="mlp", inputs=[tensor("input", FP32, [64], good.raw)])),
        ("repeated input", inf.PredictRequest(model="mlp", inputs=[good, good])),
        (
            "unknown input",
            inf.PredictRequest(model="mlp", inputs=[good, tensor("extra", FP32, [1, 64], good.raw)]),
        ),
        ("missing input", inf.PredictRequest(model="mlp")),
        ("unknown output", inf.PredictRequest(model="mlp", inputs=[good], output_names=["logits"])),
    ]


async def test_malformed_callers_never_fail_change_or_read_valid_answers(cluster: Cluster) -> None:
    predict = cluster.raw(PREDICT)
    hostile = [(what, message.SerializeToString()) for what, message in hostile_predicts()]
    wrong: list[str] = []
    valid_answers = 0
    stop = asyncio.Event()

    async def valid_caller(index: int) -> None:
        nonlocal valid_answers
        rng = torch.Generator().manual_seed(index)
        for call in range(40):
            rows = 1 + (call % 3)
            x = torch.randn(rows, 64, generator=rng)
            request_id = f"valid-{index}-{call}"
            code, details, raw = await status_of(
                predict, predict_request(x, request_id=request_id).SerializeToString()
            )
            if code is not grpc.StatusCode.OK:
                wrong.append(f"{request_id}: {code.name} {details}")
                continue
            answer = inf.PredictResponse.FromString(raw)
            got = tensor_from_proto(answer.outputs[0])
            expected = cluster.source.run("mlp", 1, x)
            if answer.request_id != request_id or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
                wrong.append(f"{request_id}: another answer (id {answer.request_id!r})")
            valid_answers += 1

    async def hostile_caller(offset: int) -> None:
        turn = offset
        while not stop.is_set():
            what, request = hostile[turn % len(hostile)]
            turn += 1
            code, details, _ = await status_of(predict, request)
            if code is not grpc.StatusCode.INVALID_ARGUMENT:
                wrong.append(f"hostile {what!r} got {code.name}: {details}")

    attackers = [asyncio.create_task(hostile_caller(i * 4)) for i in range(4)]
    await asyncio.gather(*(valid_caller(i) for i in range(8)))
    stop.set()
    await asyncio.gather(*attackers)

    assert not wrong, wrong[:10]
    assert valid_answers == 8 * 40
    coalescer = cluster.gateway.dataplane.coalescer
    assert coalescer is not None and coalescer.members > coalescer.calls, "no call was ever coalesced"


async def test_the_model_failing_on_one_input_fails_only_that_caller(cluster: Cluster) -> None:
    before = (
        REGISTRY.get_sample_value(
            "modelyard_model_server_input_failures_total", {"model": "embed", "version": "1"}
        )
        or 0.0
    )

    def ids_request(ids: torch.Tensor, request_id: str) -> bytes:
        return predict_request(ids, model="embed", name="ids", request_id=request_id).SerializeToString()

    async def round_of(call: Callable[[bytes], Any], direct: bool) -> tuple[int, list[str]]:
        rng = torch.Generator().manual_seed(7)
        good = [torch.randint(0, VOCABULARY, (1 + i % 2, 4), generator=rng) for i in range(12)]
        poison = torch.tensor([[1, 2, 500, 3]])
        requests = [ids_request(x, f"good-{i}") for i, x in enumerate(good)]
        if direct:  # the model server takes InferRequest: the same bytes plus a version
            requests = [r + b"\x10\x01" for r in requests]
        bad_request = ids_request(poison, "bad") + (b"\x10\x01" if direct else b"")
        results = await asyncio.gather(
            *(status_of(call, r) for r in [*requests[:6], bad_request, *requests[6:]])
        )
        problems = []
        bad_code, bad_details, _ = results[6]
        if (
            bad_code is not grpc.StatusCode.INVALID_ARGUMENT
            or "failed on this request's input" not in bad_details
        ):
            problems.append(f"the poisoned call got {bad_code.name}: {bad_details}")
        if "index out of range" not in bad_details:
            problems.append(f"the model's message is missing: {bad_details}")
        for x, (code, details, raw) in zip(good, [*results[:6], *results[7:]], strict=True):
            if code is not grpc.StatusCode.OK:
                problems.append(f"a good call got {code.name}: {details}")
                continue
            got = tensor_from_proto(ms.InferResponse.FromString(raw).outputs[0])
            if not torch.allclose(got, cluster.source.run("embed", 1, x), rtol=1e-5, atol=1e-6):
                problems.append("a good call got another answer")
        return len(good), problems

    for direct in (False, True):
        call = cluster.raw(INFER, direct=True) if direct else cluster.raw(PREDICT)
        for _ in range(3):
            served, problems = await round_of(call, direct)
            assert not problems, problems
    after = REGISTRY.get_sample_value(
        "modelyard_model_server_input_failures_total", {"model": "embed", "version": "1"}
    )
    # One per poisoned call, plus one per joined gateway call that held it (then resent member
    # by member); never one for a good call.
    coalescer = cluster.gateway.dataplane.coalescer
    assert coalescer is not None and after is not None
    assert after - before == 6 + coalescer.isolations


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:  # truncate
            del out[rng.randrange(len(out)) :]
        elif kind == 2:  # insert random bytes
            i = rng.randrange(len(out) + 1)
            out[i:i] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3 and out:  # a random byte
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 4 and len(out) > 2:  # duplicate a slice (repeated fields, overlong lengths)
            i = rng.randrange(len(out) - 1)
            out[i:i] = out[i : rng.randrange(i + 1, len(out))]
        else:  # a run of 0xff: overlong varints and lengths
            i = rng.randrange(len(out) + 1)
            out[i:i] = b"\xff" * rng.randint(1, 11)
    return bytes(out)


def _valid_requests() -> list[tuple[str, bool, bytes]]:
    x = torch.randn(2, 64)
    ids = torch.randint(0, VOCABULARY, (2, 4))
    raw_oip = oip.ModelInferRequest(
        model_name="mlp",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 64])],
        raw_input_contents=[tensor_to_proto("input", x).raw],
    )
    typed_oip = oip.ModelInferRequest(
        model_name="embed",
        model_version="1",
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="ids",
                datatype="INT64",
                shape=[2, 4],
                contents=oip.InferTensorContents(int64_contents=ids.reshape(-1).tolist()),
            )
        ],
    )
    infer = ms.InferRequest(model="mlp", version=1, inputs=[tensor_to_proto("input", x)])
    return [
        (PREDICT, False, predict_request(x).SerializeToString()),
        (PREDICT, False, predict_request(ids, model="embed", name="ids", version=1).SerializeToString()),
        (METADATA, False, inf.GetModelMetadataRequest(model="mlp", alias="production").SerializeToString()),
        (OIP_INFER, False, raw_oip.SerializeToString()),
        (OIP_INFER, False, typed_oip.SerializeToString()),
        (OIP_METADATA, False, oip.ModelMetadataRequest(name="mlp", version="1").SerializeToString()),
        (OIP_READY, False, oip.ModelReadyRequest(name="mlp").SerializeToString()),
        (INFER, True, infer.SerializeToString()),
        (OIP_INFER, True, raw_oip.SerializeToString()),
        (OIP_INFER, True, typed_oip.SerializeToString()),
        (OIP_METADATA, True, oip.ModelMetadataRequest(name="embed").SerializeToString()),
    ]


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _gateway_series() -> int:
    return sum(
        1
        for family in REGISTRY.collect()
        if family.name == "modelyard_gateway_requests"
        for _ in family.samples
    )


async def test_mutated_bytes_get_client_statuses_on_every_inference_rpc(cluster: Cluster) -> None:
    rng = random.Random(20261202)
    faults: list[str] = []
    valid = _valid_requests()

    async def fuzz(rounds: int) -> None:
        for method, direct, request in valid:
            call = cluster.raw(method, direct=direct)
            code, details, _ = await status_of(call, request)
            assert code is grpc.StatusCode.OK, f"{method} (direct={direct}) valid request: {details}"
            for _ in range(rounds):
                mutated = _mutate(rng, request)
                code, details, _ = await status_of(call, mutated)
                if code not in CLIENT_STATUSES:
                    faults.append(
                        f"{method} (direct={direct}) {code.name}: {details} <- {mutated.hex()[:120]}"
                    )

    await fuzz(40)  # warm every path before measuring memory
    rss, series = _rss_bytes(), _gateway_series()
    await fuzz(120)
    assert not faults, faults[:10]
    assert _rss_bytes() - rss < 48 * 1024 * 1024
    # A few new series at most (status codes of the real models, "unknown"), never one per
    # name or version a mutation made up.
    assert _gateway_series() - series <= 60

    # Nothing a caller sent changed what valid calls get.
    x = torch.randn(3, 64)
    answer = inf.PredictResponse.FromString(
        await cluster.raw(PREDICT)(predict_request(x).SerializeToString())
    )
    torch.testing.assert_close(tensor_from_proto(answer.outputs[0]), cluster.source.run("mlp", 1, x))


async def test_client_mistakes_get_precise_statuses_and_bounded_messages(cluster: Cluster) -> None:
    predict = cluster.raw(PREDICT)
    x = torch.randn(1, 64)

    async def expect(request: Any, code: grpc.StatusCode, *, call: Any = predict, reason: str = "") -> str:
        got, details, _ = await status_of(call, request.SerializeToString())
        assert got is code, (request, got, details)
        assert len(details) <= 1024
        return details

    huge = "m" * (1 << 20)
    details = await expect(predict_request(x, model=huge), grpc.StatusCode.NOT_FOUND)
    assert huge not in details and "1048576 characters" in details
    await expect(predict_request(x, version=7), grpc.StatusCode.NOT_FOUND)
    await expect(predict_request(x, version=(1 << 63) - 1), grpc.StatusCode.NOT_FOUND)
    await expect(predict_request(x, version=-1), grpc.StatusCode.INVALID_ARGUMENT)
    await expect(predict_request(x, alias="nope"), grpc.StatusCode.NOT_FOUND)
    await expect(
        inf.GetModelMetadataRequest(model="mlp", version=7),
        grpc.StatusCode.NOT_FOUND,
        call=cluster.raw(METADATA),
    )

    def oip_request(datatype: str = "FP32", shape: tuple[int, ...] = (1, 64), **fields: Any) -> Any:
        raw = fields.pop("raw", tensor_to_proto("input", x).raw)
        request = oip.ModelInferRequest(
            model_name="mlp",
            inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype=datatype, shape=shape)],
            raw_input_contents=[raw],
            **fields,
        )
        return request

    for version in ("²", "99999999999999999999", "-1", "1e3"):
        await expect(
            oip_request(model_version=version), grpc.StatusCode.INVALID_ARGUMENT, call=cluster.raw(OIP_INFER)
        )
    # The same bad OIP request gets the same answer from the gateway and a model server.
    with_contents = oip_request()
    with_contents.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    bad_requests = [
        oip_request(datatype="UINT16", raw=b"\0" * 128),
        oip_request(datatype="BYTES"),
        oip_request(shape=(2, 64)),
        oip_request(shape=(1, 32), datatype="FP64"),
        oip_request(raw=b"\0" * 12),
        with_contents,
    ]
    for request in bad_requests:
        on_gateway = await expect(request, grpc.StatusCode.INVALID_ARGUMENT, call=cluster.raw(OIP_INFER))
        on_server = await expect(
            request, grpc.StatusCode.INVALID_ARGUMENT, call=cluster.raw(OIP_INFER, direct=True)
        )
        assert on_gateway == on_server, request

    for direct in (False, True):
        raw = await cluster.raw(OIP_METADATA, direct=direct)(
            oip.ModelMetadataRequest(name="mlp").SerializeToString()
        )
        assert oip.ModelMetadataResponse.FromString(raw).platform == "pytorch_torchscript"

    # Made-up versions never become metric series.
    series = _gateway_series()
    for version in range(1000, 1300):
        await status_of(predict, predict_request(x, version=version).SerializeToString())
        await status_of(cluster.raw(OIP_INFER), oip_request(model_version=str(version)).SerializeToString())
    assert _gateway_series() - series <= 4
