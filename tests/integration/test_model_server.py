"""A real model server (port 0) against a real registry and a real Redis: it follows the
alias, downloads and verifies the artifact, loads it, and batches Infer calls made through a
grpc.aio stub; bad inputs get the right status; moving the alias swaps the versions."""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from model_server.app import ModelServerApp
from model_server.settings import ModelServerSettings
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1.model_server_service_pb2_grpc import ModelServerServiceStub
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

pytestmark = pytest.mark.integration

MODEL = "mlp"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 16])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
)


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(16, 64)
        self.out = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TinyMLP().eval()


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[RegistryApp]:
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
            # A replaced version stops being placed at once, so unloads show without waiting.
            retention_s=0.0,
        )
    )
    await app.start()
    yield app
    await app.aclose()


StartModelServer = Callable[..., Awaitable[ModelServerApp]]


@pytest.fixture
async def start_model_server(
    redis_settings: RedisSettings, registry: RegistryApp
) -> AsyncIterator[StartModelServer]:
    """Factory: a model server on port 0 following this test's Redis and registry; every one is
    closed after the test. Keyword arguments override settings."""
    apps: list[ModelServerApp] = []

    async def start(**overrides: Any) -> ModelServerApp:
        values: dict[str, Any] = {
            "server": ServerSettings(port=0, drain_grace_s=2.0, heartbeat_interval_s=0.2),
            "redis": redis_settings,
            "registry_address": registry.address,
            "reconcile_interval_s": 0.2,
            "max_batch_size": 16,
            "drain_settle_s": 0.05,
            **overrides,
        }
        app = ModelServerApp(load_settings(ModelServerSettings, **values))
        apps.append(app)
        await app.start()
        return app

    yield start
    for app in reversed(apps):
        await app.aclose()


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    """Factory: a channel to an address; every one is closed after the test."""
    opened: list[grpc.aio.Channel] = []

    def open_channel(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        await channel.close()


@pytest.fixture
def registry_stub(registry: RegistryApp, channels: Callable[[str], grpc.aio.Channel]) -> Any:
    return RegistryServiceStub(channels(registry.address))


@pytest.fixture
async def model_server(start_model_server: StartModelServer) -> ModelServerApp:
    return await start_model_server()


@pytest.fixture
def stub(model_server: ModelServerApp, channels: Callable[[str], grpc.aio.Channel]) -> Any:
    return ModelServerServiceStub(channels(model_server.address))


# -- helpers --------------------------------------------------------------------------------


async def publish(registry_stub: Any, data: bytes, *, create: bool = True) -> int:
    """Create the model (once) and upload a version; returns its number."""
    if create:
        await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL, description="tiny"))

    async def requests() -> AsyncIterator[reg.UploadModelVersionRequest]:
        yield reg.UploadModelVersionRequest(
            metadata=reg.UploadModelVersionMetadata(
                model=MODEL,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
            )
        )
        for start in range(0, len(data), 4096):
            yield reg.UploadModelVersionRequest(chunk=data[start : start + 4096])

    response = await registry_stub.UploadModelVersion(requests())
    return int(response.model_version.version)


async def point(registry_stub: Any, version: int) -> None:
    await registry_stub.SetAlias(reg.SetAliasRequest(model=MODEL, alias="production", version=version))


async def wait_for_states(
    stub: Any, expected: dict[int, int], *, timeout_s: float = 30.0
) -> ms.GetServerStatusResponse:
    """Poll GetServerStatus until the server holds exactly `expected` ({version: state})."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        status = await stub.GetServerStatus(ms.GetServerStatusRequest())
        held = {v.version: v.state for v in status.loaded_versions if v.model == MODEL}
        if held == expected:
            return status
        if loop.time() > end:
            raise AssertionError(f"the server holds {held}, expected {expected}: {status}")
        await asyncio.sleep(0.02)


def infer_request(x: torch.Tensor, version: int, *, name: str = "input", **kw: Any) -> ms.InferRequest:
    return ms.InferRequest(model=MODEL, version=version, inputs=[tensor_to_proto(name, x)], **kw)


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


READY = ms.VERSION_STATE_READY


# -- tests ----------------------------------------------------------------------------------


async def test_32_concurrent_callers_get_what_in_process_torch_computes(
    registry_stub: Any, stub: Any
) -> None:
    version = await publish(registry_stub, torchscript_bytes(mlp(1)))
    await point(registry_stub, version)
    status = await wait_for_states(stub, {version: READY})
    (loaded,) = status.loaded_versions
    assert loaded.signature == SIGNATURE and loaded.device == "cpu"

    rng = random.Random(7)
    inputs = [torch.randn(rng.randint(1, 4), 16) for _ in range(32)]
    responses = await asyncio.gather(
        *(stub.Infer(infer_request(x, version, request_id=f"caller-{i}")) for i, x in enumerate(inputs))
    )
    reference = mlp(1)
    for i, (x, response) in enumerate(zip(inputs, responses, strict=True)):
        assert (response.model, response.version, response.request_id) == (MODEL, version, f"caller-{i}")
        (output,) = response.outputs
        assert output.name == "output"
        with torch.inference_mode():
            expected = reference(x)
        torch.testing.assert_close(tensor_from_proto(output), expected, rtol=1e-5, atol=1e-6)
        assert response.timing.batch_size >= x.shape[0]


async def test_bad_requests_get_the_right_status_and_field(registry_stub: Any, stub: Any) -> None:
    version = await publish(registry_stub, torchscript_bytes(mlp(1)))
    await point(registry_stub, version)
    await wait_for_states(stub, {version: READY})

    err = await failure(stub.Infer(infer_request(torch.zeros(2, 16, dtype=torch.float64), version)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err) == ["inputs[input].data_type"] and "FP32" in (err.details() or "")

    err = await failure(stub.Infer(infer_request(torch.zeros(2, 15), version)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err) == ["inputs[input].shape"]

    err = await failure(stub.Infer(infer_request(torch.zeros(2, 16), version, name="inptu")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err) == ["inputs[inptu]"]

    err = await failure(stub.Infer(infer_request(torch.zeros(2, 16), version, output_names=["logits"])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err) == ["output_names"]

    err = await failure(stub.Infer(infer_request(torch.zeros(2, 16), version + 5)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert f"ready here: {MODEL} v{version}" in (err.details() or "")


async def test_moving_the_alias_loads_the_new_version_and_unloads_the_old(
    registry_stub: Any, stub: Any, model_server: ModelServerApp, store: CoordinationStore
) -> None:
    first = await publish(registry_stub, torchscript_bytes(mlp(1)))
    second = await publish(registry_stub, torchscript_bytes(mlp(2)), create=False)
    await point(registry_stub, first)
    await wait_for_states(stub, {first: READY})

    await point(registry_stub, second)
    await wait_for_states(stub, {second: READY})
    x = torch.randn(3, 16)
    response = await stub.Infer(infer_request(x, second))
    with torch.inference_mode():
        torch.testing.assert_close(tensor_from_proto(response.outputs[0]), mlp(2)(x), rtol=1e-5, atol=1e-6)
    err = await failure(stub.Infer(infer_request(x, first)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE

    # The heartbeat tells the cluster what this server holds now.
    record = await heartbeat_of(
        store, model_server.service_id, lambda r: [v.version for v in r.versions] == [second]
    )
    (held,) = record.versions
    assert (held.model, held.state, held.platform) == (MODEL, "ready", "torchscript")
    assert held.signature["inputs"][0]["name"] == "input"


async def heartbeat_of(
    store: CoordinationStore, service_id: str, condition: Callable[[ServiceRecord], bool]
) -> ServiceRecord:
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while True:
        records = {r.id: r for r in await store.list_services()}
        record = records.get(service_id)
        if record is not None and condition(record):
            assert record.kind == "model_server"
            return record
        if loop.time() > end:
            raise AssertionError(f"heartbeat never showed the expected state: {record}")
        await asyncio.sleep(0.02)


class SlowMLP(torch.nn.Module):
    """About 10 ms per forward whatever the batch: the drain has real work to finish."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1000):
            x = torch.tanh(self.hidden(x))
        return self.out(x)


async def test_a_late_server_loads_the_aliased_version_and_close_answers_every_accepted_call(
    registry_stub: Any, start_model_server: StartModelServer, channels: Callable[[str], grpc.aio.Channel]
) -> None:
    torch.manual_seed(0)
    slow = SlowMLP().eval()
    version = await publish(registry_stub, torchscript_bytes(slow))
    await point(registry_stub, version)
    app = await start_model_server(max_batch_size=4)  # started after the alias moved
    stub = ModelServerServiceStub(channels(app.address))
    await wait_for_states(stub, {version: READY})
    loaded = app.repository.get(MODEL, version)
    assert loaded is not None

    inputs = [torch.randn(1, 16) for _ in range(40)]

    async def call(x: torch.Tensor) -> ms.InferResponse:
        return await stub.Infer(infer_request(x, version))

    calls = [asyncio.create_task(call(x)) for x in inputs]
    # Every call accepted: waiting in the batcher or already answered.
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    while loaded.outstanding + sum(c.done() for c in calls) < len(calls):
        assert loop.time() < end, "the calls never reached the batcher"
        await asyncio.sleep(0.001)
    assert loaded.outstanding > 0, "nothing left for the drain to finish; slow the model down"

    await app.aclose()
    responses = await asyncio.gather(*calls)
    with torch.inference_mode():
        for x, response in zip(inputs, responses, strict=True):
            torch.testing.assert_close(tensor_from_proto(response.outputs[0]), slow(x), rtol=1e-5, atol=1e-6)
    # Calls piled up behind a slow forward leave together.
    assert max(r.timing.batch_size for r in responses) > 1
    err = await failure(stub.Infer(infer_request(inputs[0], version), timeout=2))
    assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
