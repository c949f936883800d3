"""The Open Inference Protocol on a real model server (port 0, real registry and Redis),
driven with the generated `inference.GRPCInferenceService` stubs: health, metadata, Triton's
ModelConfig, ModelInfer with raw and typed contents, ModelStatistics, per-version
grpc.health.v1, and versions loaded and unloaded under traffic with no failed request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from model_server.app import ModelServerApp, version_health_name
from modelyard import oip_codec
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.oip import model_config_pb2
from modelyard.oip.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.integration import test_model_server as base
from tests.integration.test_model_server import (
    MODEL,
    READY,
    bad_fields,
    failure,
    mlp,
    point,
    publish,
    torchscript_bytes,
    wait_for_states,
)

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The model server test module's fixtures, shared by name.
registry = base.registry
start_model_server = base.start_model_server
channels = base.channels
registry_stub = base.registry_stub
model_server = base.model_server
stub = base.stub


@pytest.fixture
def oip_stub(model_server: ModelServerApp, channels: Callable[[str], grpc.aio.Channel]) -> Any:
    return GRPCInferenceServiceStub(channels(model_server.address))


def raw_request(x: torch.Tensor, version: str = "", **kw: Any) -> oip.ModelInferRequest:
    return oip.ModelInferRequest(
        model_name=MODEL,
        model_version=version,
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(x.shape))],
        raw_input_contents=[oip_codec.tensor_to_raw(x)],
        **kw,
    )


def output_of(response: oip.ModelInferResponse) -> torch.Tensor:
    out = response.outputs[0]
    return oip_codec.decode_input(
        oip.ModelInferRequest.InferInputTensor(name=out.name, datatype=out.datatype, shape=out.shape),
        response.raw_output_contents[0],
    )


async def test_oip_endpoints_describe_and_serve_the_model(
    registry_stub: Any,
    stub: Any,
    oip_stub: Any,
    model_server: ModelServerApp,
    channels: Callable[[str], grpc.aio.Channel],
) -> None:
    assert (await oip_stub.ServerLive(oip.ServerLiveRequest())).live
    assert (await oip_stub.ServerReady(oip.ServerReadyRequest())).ready
    assert not (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL))).ready

    version = await publish(registry_stub, torchscript_bytes(mlp(1)))
    await point(registry_stub, version)
    await wait_for_states(stub, {version: READY})

    assert (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL))).ready
    assert (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL, version=str(version)))).ready
    assert not (await oip_stub.ModelReady(oip.ModelReadyRequest(name=MODEL, version="99"))).ready

    server = await oip_stub.ServerMetadata(oip.ServerMetadataRequest())
    assert server.name == "modelyard" and "model_configuration" in server.extensions

    metadata = await oip_stub.ModelMetadata(oip.ModelMetadataRequest(name=MODEL))
    assert (metadata.name, list(metadata.versions), metadata.platform) == (
        MODEL,
        [str(version)],
        "pytorch_torchscript",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("input", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("output", "FP32", [-1, 4])]

    config = (await oip_stub.ModelConfig(oip.ModelConfigRequest(name=MODEL))).config
    assert (config.name, config.platform, config.max_batch_size) == (MODEL, "pytorch_libtorch", 16)
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [16])
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [4])]
    assert config.HasField("dynamic_batching")

    def served(code: str) -> float:
        """Calls the monitor sees for this version (process-wide counter: read as deltas)."""
        labels = {"model": MODEL, "version": str(version), "code": code}
        return REGISTRY.get_sample_value("modelyard_model_server_requests_total", labels) or 0.0

    ok_before, invalid_before = served("OK"), served("INVALID_ARGUMENT")

    # Raw contents, many callers at once, "" = the highest ready version.
    reference = mlp(1)
    inputs = [torch.randn(n, 16) for n in (1, 3, 2, 5, 1, 4)]
    responses = await asyncio.gather(
        *(oip_stub.ModelInfer(raw_request(x, id=f"r{i}")) for i, x in enumerate(inputs))
    )
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert (response.model_name, response.model_version, response.id) == (MODEL, str(version), f"r{i}")
        with torch.inference_mode():
            torch.testing.assert_close(output_of(response), reference(x), rtol=1e-5, atol=1e-6)

    # Typed contents in, typed contents out when no raw input was sent.
    x = torch.randn(2, 16)
    typed = oip.ModelInferRequest(
        model_name=MODEL,
        model_version=str(version),
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="input",
                datatype="FP32",
                shape=[2, 16],
                contents=oip.InferTensorContents(fp32_contents=x.reshape(-1).tolist()),
            )
        ],
        outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="output")],
    )
    response = await oip_stub.ModelInfer(typed)
    with torch.inference_mode():
        torch.testing.assert_close(output_of(response), reference(x), rtol=1e-5, atol=1e-6)

    # Errors: wrong shape names the field; unknown model is NOT_FOUND; bad version string.
    err = await failure(oip_stub.ModelInfer(raw_request(torch.randn(2, 15))))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["inputs[input].shape"]
    err = await failure(oip_stub.ModelInfer(oip.ModelInferRequest(model_name="nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await failure(oip_stub.ModelInfer(raw_request(torch.randn(1, 16), version="x")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await failure(
        oip_stub.ModelInfer(
            raw_request(
                torch.randn(1, 16), outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name="z")]
            )
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == ["outputs[z]"]

    statistics = await oip_stub.ModelStatistics(oip.ModelStatisticsRequest(name=MODEL))
    (stats,) = statistics.model_stats
    assert (stats.name, stats.version) == (MODEL, str(version))
    assert stats.inference_stats.success.count == len(inputs) + 1
    assert stats.inference_count == sum(x.shape[0] for x in inputs) + 2
    assert 1 <= stats.execution_count <= len(inputs) + 1
    assert stats.inference_stats.compute_infer.ns > 0 and stats.last_inference > 0
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    # Direct OIP calls count in the monitor's request figures, as the gateway's Infer calls do
    # (the shape error too; calls refused before a version was chosen do not).
    assert served("OK") - ok_before == len(inputs) + 1
    assert served("INVALID_ARGUMENT") - invalid_before == 1

    health = health_pb2_grpc.HealthStub(channels(model_server.address))
    name = version_health_name(MODEL, version)
    for _ in range(200):  # the health follower runs on the server's loop
        check = await health.Check(health_pb2.HealthCheckRequest(service=name))
        if check.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.01)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


async def test_versions_load_and_unload_under_traffic_without_a_failed_request(
    registry_stub: Any,
    stub: Any,
    oip_stub: Any,
    model_server: ModelServerApp,
    channels: Callable[[str], grpc.aio.Channel],
) -> None:
    first = await publish(registry_stub, torchscript_bytes(mlp(1)))
    await point(registry_stub, first)
    await wait_for_states(stub, {first: READY})

    stop = asyncio.Event()
    served: dict[str, int] = {}
    errors: list[BaseException] = []

    async def caller(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        while not stop.is_set():
            x = torch.randn(1 + seed % 3, 16, generator=gen)
            try:
                response = await oip_stub.ModelInfer(raw_request(x), timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)
                continue
            assert output_of(response).shape == (x.shape[0], 4)
            served[response.model_version] = served.get(response.model_version, 0) + 1

    callers = [asyncio.create_task(caller(i)) for i in range(8)]
    try:
        second = await publish(registry_stub, torchscript_bytes(mlp(2)), create=False)
        await point(registry_stub, second)
        await wait_for_states(stub, {second: READY})  # loaded beside the first, then the first unloaded
        third = await publish(registry_stub, torchscript_bytes(mlp(3)), create=False)
        await point(registry_stub, third)
        await wait_for_states(stub, {third: READY})
        seen = sum(served.values())
        while sum(served.values()) < seen + 16:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*callers)
    assert errors == []
    assert str(first) in served and str(third) in served

    # The unloaded versions' health services say so; the held one serves.
    health = health_pb2_grpc.HealthStub(channels(model_server.address))
    expected = {first: NOT_SERVING, second: NOT_SERVING, third: SERVING}
    for _ in range(200):  # the health follower runs on the server's loop
        got = {
            v: (
                await health.Check(health_pb2.HealthCheckRequest(service=version_health_name(MODEL, v)))
            ).status
            for v in expected
        }
        if got == expected:
            break
        await asyncio.sleep(0.01)
    assert got == expected


async def test_the_repository_and_stream_rpcs_say_where_to_go_instead(oip_stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await oip_stub.RepositoryIndex(oip.RepositoryIndexRequest())
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "deployments in the registry" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await oip_stub.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=MODEL))
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED

    async def one() -> Any:
        yield raw_request(torch.zeros(1, 16))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in oip_stub.ModelStreamInfer(one()):
            pass
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "gateway" in (caught.value.details() or "")
