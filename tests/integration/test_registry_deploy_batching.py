"""Preferred batch sizes and execution end to end, on real Redis and real servers: refused by
the registry when out of range, set with `modelyard deploy set`, stored, audited, written to
Redis, and served by a real model server; one its own defaults cannot serve keeps the copy
already serving, and the next good deployment is applied."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
import typer
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from typer.testing import CliRunner

from model_server.app import ModelServerApp
from model_server.repository import LoadedVersion, VersionState
from model_server.settings import ModelServerSettings
from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli import registry as cli_registry
from registry_service.app import RegistryApp

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

MODEL = "mlp"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
)


@pytest.fixture
async def stub(registry: RegistryApp) -> AsyncIterator[RegistryServiceAsyncStub]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        yield RegistryServiceStub(channel)


@pytest.fixture
async def model_server(redis_settings: RedisSettings, registry: RegistryApp) -> AsyncIterator[ModelServerApp]:
    app = ModelServerApp(
        load_settings(
            ModelServerSettings,
            server=ServerSettings(port=0, metrics_port=0, drain_grace_s=1.0, heartbeat_interval_s=0.2),
            redis=redis_settings,
            registry_address=registry.address,
            reconcile_interval_s=0.2,
            max_batch_size=8,
        )
    )
    await app.start()
    yield app
    await app.aclose()


def torchscript() -> bytes:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval()), buffer)
    return buffer.getvalue()


async def upload(stub: RegistryServiceAsyncStub, model: str, data: bytes) -> None:
    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(
            metadata=pb.UploadModelVersionMetadata(
                model=model,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
            )
        )
        yield pb.UploadModelVersionRequest(chunk=data)

    await stub.UploadModelVersion(requests())


async def cli(registry: RegistryApp, *args: str) -> tuple[int, str]:
    """Run a `modelyard` command in a thread (it runs its own event loop)."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, [*args, "--registry", registry.address], catch_exceptions=False
    )
    return result.exit_code, result.output


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None, err.details()
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def served(
    app: ModelServerApp,
    check: Callable[[LoadedVersion], bool] = lambda _: True,
    model: str = MODEL,
    timeout_s: float = 30.0,
) -> LoadedVersion:
    """Version 1 of `model` once the model server holds it ready and `check` holds for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        held = app.repository.get(model, 1)
        if held is not None and held.state is VersionState.READY and check(held):
            return held
        assert loop.time() < deadline, f"not served as wanted in time: {held}"
        await asyncio.sleep(0.05)


async def test_batching_settings_go_from_the_cli_to_a_serving_model_server(
    registry: RegistryApp,
    stub: RegistryServiceAsyncStub,
    store: CoordinationStore,
    model_server: ModelServerApp,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_registry, "console", Console(width=200))
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL))
    await upload(stub, MODEL, torchscript())
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))

    refused = {
        "deployment.preferred_batch_sizes": registry_pb2.Deployment(
            max_batch_size=4, preferred_batch_sizes=[8]
        ),
        "deployment.execution": registry_pb2.Deployment(execution="loop", instances=2),
    }
    for field, deployment in refused.items():
        err = await failure(stub.SetDeployment(pb.SetDeploymentRequest(model=MODEL, deployment=deployment)))
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err) == [field]

    code, out = await cli(
        registry, "deploy", "set", MODEL, "--max-batch-size", "8", "--preferred-batch-sizes", "4, 2",
        "--execution", "thread",
    )  # fmt: skip
    assert code == 0 and "preferred batch sizes" in out and "2, 4" in out and "thread" in out, out
    code, out = await cli(registry, "deploy", "set", MODEL, "--preferred-batch-sizes", "2,x")
    assert code == 2 and "--preferred-batch-sizes" in out, out

    got = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    assert (list(got.preferred_batch_sizes), got.execution) == ([2, 4], "thread")
    live = (await store.all_deployments())[MODEL]
    assert (live.preferred_batch_sizes, live.execution) == ([2, 4], "thread")
    audit = await stub.ListAuditEntries(pb.ListAuditEntriesRequest(model=MODEL, method="SetDeployment"))
    assert audit.entries[0].message.startswith(
        'max_batch_size 0 -> 8; preferred_batch_sizes [] -> [2, 4]; execution "" -> "thread"; placed versions'
    ), audit.entries[0].message

    first = await served(model_server, lambda v: v.serving.batch.preferred_batch_sizes == (2, 4))
    assert first.batcher is not None and first.batcher.execution == "thread"

    # The registry cannot know this server's max_batch_size (8): it accepts 16, the model
    # server refuses it and keeps the copy it serves.
    await stub.SetDeployment(
        pb.SetDeploymentRequest(model=MODEL, deployment=registry_pb2.Deployment(preferred_batch_sizes=[16]))
    )
    # Other models are unaffected: one aliased now still loads (the pass that loads it has
    # seen the bad deployment).
    await stub.CreateModel(pb.CreateModelRequest(name="other"))
    await upload(stub, "other", torchscript())
    await stub.SetAlias(pb.SetAliasRequest(model="other", alias="production", version=1))
    await served(model_server, model="other")
    assert model_server.repository.get(MODEL, 1) is first and first.state is VersionState.READY
    # ... and says why in the heartbeat.
    assert first.error.startswith("reconfiguration failed") and "16" in first.error, first.error

    # The reconciler is still at work: the next good deployment is applied.
    await stub.SetDeployment(
        pb.SetDeploymentRequest(model=MODEL, deployment=registry_pb2.Deployment(execution="loop"))
    )
    second = await served(model_server, lambda v: v.serving.batch.execution == "loop")
    assert second.batcher is not None and second.batcher.execution == "loop"
    assert second.serving.batch.preferred_batch_sizes == ()
