"""The whole cluster as child processes (embedded Redis, registry, monitor, model server,
gateway), driven through the public contracts as a client would."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.tls import open_channel
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import monitor_service_pb2 as mon
from modelyard.v1 import monitor_service_pb2_grpc as mon_grpc
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1 import registry_service_pb2_grpc as reg_grpc
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
from modelyard_cli.local_cluster import LocalCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    local = LocalCluster(data_dir=tmp_path / "cluster", ports="free", env={"MODELYARD_LOG_LEVEL": "INFO"})
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # aio errors carry the same metadata
    assert status is not None, error
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo in the status")


async def test_register_promote_predict_with_32_concurrent_callers(cluster: LocalCluster) -> None:
    module, artifact = build_demo_model(seed=3)
    version = await register_model(
        cluster.address_of("registry"), "e2e", artifact, demo_signature(), token=cluster.api_key
    )
    # Wait until the version serves, then fire 32 concurrent callers with distinct inputs.
    await predict_until_served(cluster.gateway_address, "e2e", [torch.zeros(1, 64)], token=cluster.api_key)

    generator = torch.Generator().manual_seed(99)
    inputs = [torch.randn(1 + i % 4, 64, generator=generator) for i in range(32)]
    async with open_channel(cluster.gateway_address, None, token=cluster.api_key) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)

        async def call(i: int) -> inf.PredictResponse:
            reply: inf.PredictResponse = await stub.Predict(
                inf.PredictRequest(
                    model="e2e",
                    alias="production",
                    request_id=f"call-{i}",
                    inputs=[tensor_to_proto("input", inputs[i])],
                ),
                timeout=30,
            )
            return reply

        for _ in range(3):  # several rounds, so batches of different make-up are exercised
            replies = await asyncio.gather(*(call(i) for i in range(32)))
            for i, reply in enumerate(replies):
                assert reply.version == version
                assert reply.model == "e2e"
                assert reply.request_id == f"call-{i}"
                with torch.inference_mode():
                    expected = module(inputs[i])
                torch.testing.assert_close(
                    tensor_from_proto(reply.outputs[0]), expected, rtol=1e-5, atol=1e-6
                )

        # Bad input: precise statuses that say what to fix, and the cluster keeps serving.
        def request(**kw: object) -> inf.PredictRequest:
            tensor = tensor_to_proto("input", torch.zeros(2, 64))
            for key, value in kw.items():
                setattr(tensor, key, value)
            return inf.PredictRequest(model="e2e", inputs=[tensor])

        cases = {
            "unknown model": (inf.PredictRequest(model="nope"), grpc.StatusCode.NOT_FOUND),
            "unknown alias": (inf.PredictRequest(model="e2e", alias="canary"), grpc.StatusCode.NOT_FOUND),
            "wrong dtype": (
                request(data_type=tensor_pb2.DATA_TYPE_FP64, raw=bytes(2 * 64 * 8)),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "wrong name": (request(name="x"), grpc.StatusCode.INVALID_ARGUMENT),
        }
        wrong_shape = tensor_to_proto("input", torch.zeros(2, 63))
        cases["wrong shape"] = (
            inf.PredictRequest(model="e2e", inputs=[wrong_shape]),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        for name, (bad, code) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(bad, timeout=10)
            assert err.value.code() is code, name
            assert err.value.details(), name

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(inf.PredictRequest(model="e2e", inputs=[wrong_shape]), timeout=10)
        assert "64" in (err.value.details() or "")
        assert _reason(err.value) == "SIGNATURE_MISMATCH"

        again = await call(0)
        assert again.version == version

    # The monitor reports every service up and the model server holding e2e.
    async with open_channel(cluster.address_of("monitor"), None, token=cluster.api_key) as channel:
        status = await mon_grpc.MonitorServiceStub(channel).GetClusterStatus(mon.GetClusterStatusRequest())
    assert {s.kind for s in status.services} == {
        mon.SERVICE_KIND_GATEWAY,
        mon.SERVICE_KIND_MODEL_SERVER,
        mon.SERVICE_KIND_REGISTRY,
        mon.SERVICE_KIND_MONITOR,
    }
    assert all(s.state == mon.SERVICE_STATE_UP for s in status.services)
    servers = [s for s in status.services if s.kind == mon.SERVICE_KIND_MODEL_SERVER]
    assert any(v.model == "e2e" and v.version == version for v in servers[0].loaded_versions)


async def test_corrupt_upload_is_refused_and_nothing_is_stored(cluster: LocalCluster) -> None:
    _, artifact = build_demo_model()
    async with open_channel(cluster.address_of("registry"), None, token=cluster.api_key) as channel:
        stub = reg_grpc.RegistryServiceStub(channel)
        await stub.CreateModel(reg.CreateModelRequest(name="corrupt"))

        async def upload() -> AsyncIterator[reg.UploadModelVersionRequest]:
            yield reg.UploadModelVersionRequest(
                metadata=reg.UploadModelVersionMetadata(
                    model="corrupt",
                    format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                    sha256=hashlib.sha256(artifact).hexdigest(),
                    signature=demo_signature(),
                )
            )
            damaged = bytearray(artifact)
            damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in transit
            yield reg.UploadModelVersionRequest(chunk=bytes(damaged))

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UploadModelVersion(upload())
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(err.value) == "CHECKSUM_MISMATCH"
        versions = await stub.ListModelVersions(reg.ListModelVersionsRequest(model="corrupt"))
        assert list(versions.model_versions) == []
