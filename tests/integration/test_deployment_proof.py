"""The proof of a device, precision or optimization change, end to end on real Redis, a real
registry and real model servers: SetDeployment has a model server measure each placed version
under the new setting against fp32 eager on the CPU; beyond the tolerance the change is refused
with FAILED_PRECONDITION and the figures and the fp32 copy keeps serving; within it the change
is stored with its report (`modelyard deploy show`); no model server for the device, a version
without a baseline, or a model server that does not answer in time are refused too."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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
from modelyard.access.keys import new_key_token
from modelyard.baseline import compute_baseline
from modelyard.settings import AccessSettings, RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.tls import open_channel
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.model_server_service_pb2_grpc import ModelServerServiceStub
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli import registry as cli_registry
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

MODEL = "sensitive"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 16])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
)

StartRegistry = Callable[..., Awaitable[RegistryApp]]


@pytest.fixture
async def start_registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[StartRegistry]:
    """Registries with settings of their own (a proof timeout, access control); the plain one
    is the shared `registry` fixture."""
    apps: list[RegistryApp] = []

    async def start(**overrides: Any) -> RegistryApp:
        app = RegistryApp(
            load_settings(
                RegistrySettings,
                server=ServerSettings(port=0, drain_grace_s=1.0),
                redis=redis_settings,
                data_dir=tmp_path / f"registry-{len(apps)}",
                **overrides,
            )
        )
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.aclose()


@pytest.fixture
async def stub(registry: RegistryApp) -> AsyncIterator[RegistryServiceAsyncStub]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        yield RegistryServiceStub(channel)


def sensitive_model() -> torch.nn.Module:
    """A linear layer whose weights span six orders of magnitude: bf16's 8-bit mantissa moves
    its outputs by far more than fp32 rounding, yet every output stays finite."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 16) * torch.logspace(-3, 3, 16))
    return layer.eval()


def torchscript(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def baselines() -> list[registry_pb2.InputBaseline]:
    return compute_baseline({"x": torch.randn(512, 16, generator=torch.Generator().manual_seed(3)) * 2 + 1})


async def upload(
    stub: RegistryServiceAsyncStub, data: bytes, input_baselines: list[registry_pb2.InputBaseline]
) -> None:
    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(
            metadata=pb.UploadModelVersionMetadata(
                model=MODEL,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
                input_baselines=input_baselines,
            )
        )
        yield pb.UploadModelVersionRequest(chunk=data)

    await stub.UploadModelVersion(requests())


async def deployed_model(
    stub: RegistryServiceAsyncStub, input_baselines: list[registry_pb2.InputBaseline] | None = None
) -> None:
    """The sensitive model, version 1 aliased production (so placed), fp32 on the CPU."""
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL))
    await upload(
        stub, torchscript(sensitive_model()), baselines() if input_baselines is None else input_baselines
    )
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))


async def served(
    app: ModelServerApp, check: Callable[[LoadedVersion], bool] = lambda _: True, timeout_s: float = 60.0
) -> LoadedVersion:
    """Version 1 once the model server holds it ready and `check` holds for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        held = app.repository.get(MODEL, 1)
        if held is not None and held.state is VersionState.READY and check(held):
            return held
        assert loop.time() < deadline, f"not served as wanted in time: {held}"
        await asyncio.sleep(0.05)


def change(**fields: Any) -> pb.SetDeploymentRequest:
    """A SetDeploymentRequest changing only the fields given (an update mask)."""
    skip_proof = fields.pop("skip_proof", False)
    request = pb.SetDeploymentRequest(
        model=MODEL, deployment=registry_pb2.Deployment(**fields), skip_proof=skip_proof
    )
    request.update_mask.paths.extend(fields)
    return request


async def failure(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    # cast: an aio error is a grpc.Call at run time; the stubs type the two apart.
    status = rpc_status.from_call(cast("grpc.Call", err))
    assert status is not None, err.details()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {err.details()}")


async def predict(server: ModelServerApp, x: torch.Tensor) -> torch.Tensor:
    async with grpc.aio.insecure_channel(server.address) as channel:
        answer = await ModelServerServiceStub(channel).Infer(
            ms.InferRequest(model=MODEL, version=1, inputs=[tensor_to_proto("x", x)])
        )
    return tensor_from_proto(answer.outputs[0])


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


async def test_a_precision_change_beyond_the_tolerance_is_refused_with_the_figures_and_fp32_keeps_serving(
    registry: RegistryApp, stub: RegistryServiceAsyncStub, launch: Callable[..., Any]
) -> None:
    server = await launch(registry)
    await deployed_model(stub)
    first = await served(server)
    before = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment

    err = await failure(stub.SetDeployment(change(precision="bf16", max_abs_error=1e-3)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
    details = err.details() or ""
    assert "not changed" in details and "fp32/none on the default device -> bf16/none" in details, details
    assert "max abs error" in details and "> max_abs_error 0.001" in details and "version 1" in details
    assert "on 256 baseline items" in details and "against fp32 eager on the CPU" in details, details
    assert len(details) <= 1024
    info = error_info(err)
    assert info.metadata["model"] == MODEL and info.metadata["version"] == "1"
    assert float(info.metadata["max_abs_error"]) > 1e-3 and float(info.metadata["max_rel_error"]) > 0
    assert info.metadata["server_id"] == server.service_id and info.metadata["device"] == "cpu"

    # Nothing changed: the deployment, its epoch, the stored reports, and what serves.
    after = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    assert after == before and after.precision == "" and not after.HasField("max_abs_error")
    version = (await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL, version=1))).model_version
    assert list(version.optimization_reports) == []
    await asyncio.sleep(0.6)  # three reconcile rounds: a published change would start a reload
    assert server.repository.get(MODEL, 1) is first and first.serving.precision == "fp32"
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(9)) * 2 + 1
    with torch.inference_mode():
        expected = sensitive_model()(x)
    torch.testing.assert_close(await predict(server, x), expected, rtol=1e-6, atol=1e-5)

    # The opt-out stores it unproven; the model server's own load-time gate then refuses it,
    # and fp32 still serves.
    await stub.SetDeployment(change(precision="bf16", max_abs_error=1e-3, skip_proof=True))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while "tolerance" not in first.error:
        assert loop.time() < deadline, first.error
        await asyncio.sleep(0.05)
    assert server.repository.get(MODEL, 1) is first and first.serving.precision == "fp32"


async def test_a_precision_change_within_the_tolerance_is_applied_and_its_proof_shown(
    registry: RegistryApp,
    stub: RegistryServiceAsyncStub,
    launch: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_registry, "console", Console(width=200))
    server = await launch(registry)
    await deployed_model(stub)
    await served(server)

    code, out = await cli(registry, "deploy", "set", MODEL, "--precision", "bf16", "--max-abs-error", "1e6")
    assert code == 0, out
    deployment = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    assert deployment.precision == "bf16" and deployment.max_abs_error == 1e6
    version = (await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL, version=1))).model_version
    (report,) = version.optimization_reports
    assert (report.optimization, report.precision, report.device, report.reference_device) == (
        "none",
        "bf16",
        "cpu",
        "cpu",
    )
    assert report.max_abs_error > 1e-3 and report.max_rel_error > 0 and report.sample == "baseline"
    assert report.server_id == server.service_id and report.sample_items == 256
    assert not report.HasField("top1_agreement") or 0 <= report.top1_agreement <= 1

    code, out = await cli(registry, "deploy", "show", MODEL)
    assert code == 0 and "proof of the device / precision / optimization" in out, out
    assert f"{report.max_abs_error:.3g}" in out and "256 baseline" in out and server.service_id in out, out

    # The swap is the existing one: the model server reloads the version in bf16.
    reloaded = await served(server, lambda v: v.serving.precision == "bf16")
    assert reloaded.report is not None and reloaded.report.precision == "bf16"


async def test_a_device_no_model_server_has_is_refused_and_nothing_changes(
    registry: RegistryApp, stub: RegistryServiceAsyncStub, launch: Callable[..., Any]
) -> None:
    server = await launch(registry)
    await deployed_model(stub)
    await served(server)
    before = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    absent = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU this machine has

    err = await failure(stub.SetDeployment(change(device=absent, max_abs_error=1e-2)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert f"no model server can run device {absent!r}" in (err.details() or ""), err.details()
    assert "the live model servers have cpu" in (err.details() or ""), err.details()
    assert (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment == before


async def test_a_version_without_a_baseline_is_refused_unless_the_proof_is_skipped(
    registry: RegistryApp, stub: RegistryServiceAsyncStub, launch: Callable[..., Any]
) -> None:
    await launch(registry)
    await deployed_model(stub, input_baselines=[])

    err = await failure(stub.SetDeployment(change(precision="bf16", max_abs_error=1e6)))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert "no input baseline for 'x'" in (err.details() or "") and "skip_proof" in (err.details() or "")
    assert (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment.precision == ""

    # Without a tolerance there is nothing to prove; with skip_proof it is stored unproven.
    await stub.SetDeployment(change(precision="bf16", max_abs_error=1e6, skip_proof=True))
    assert (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment.precision == "bf16"


async def test_a_model_server_that_does_not_measure_in_time_gives_unavailable_and_nothing_changes(
    start_registry: StartRegistry, launch: Callable[..., Any]
) -> None:
    # 50 ms cannot fetch, load twice and measure a version (the measurement alone runs
    # forwards for 0.3 s at each of two batch sizes): the registry's deadline expires first.
    registry = await start_registry(proof_timeout_s=0.05)
    server = await launch(registry)
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub: RegistryServiceAsyncStub = RegistryServiceStub(channel)
        await deployed_model(stub)
        await served(server)
        err = await failure(stub.SetDeployment(change(precision="bf16", max_abs_error=1e6)))
        assert err.code() is grpc.StatusCode.UNAVAILABLE, err.details()
        assert "did not measure version 1 within 0.05s" in (err.details() or ""), err.details()
        assert (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment.precision == ""


async def test_with_access_on_the_registry_proves_as_service_registry(
    start_registry: StartRegistry, launch: Callable[..., Any], tmp_path: Path
) -> None:
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(b"s" * 32)
    access = AccessSettings(mode="enforce", service_secret_file=secret)
    _, admin_token = new_key_token()
    registry = await start_registry(access=access, admin_key=admin_token)
    server = await launch(registry, access=access)
    async with open_channel(registry.address, None, token=admin_token) as channel:
        stub: RegistryServiceAsyncStub = RegistryServiceStub(channel)
        await deployed_model(stub)
        await served(server)
        # The model server takes EvaluateOptimizations only from the cluster's services: the
        # figures in the refusal show the registry's own token was let through.
        err = await failure(stub.SetDeployment(change(precision="bf16", max_abs_error=1e-3)))
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "beyond its tolerance" in (err.details() or ""), err.details()
        await stub.SetDeployment(change(precision="bf16", max_abs_error=1e6))
        version = (
            await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL, version=1))
        ).model_version
        assert [r.reference_device for r in version.optimization_reports] == ["cpu"]


async def test_an_alias_moved_during_the_proof_is_proven_again_before_the_write(
    registry: RegistryApp,
    stub: RegistryServiceAsyncStub,
    launch: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await launch(registry)
    await deployed_model(stub)
    await upload(stub, torchscript(sensitive_model()), baselines())  # version 2, not placed yet
    await served(server)
    caplog.set_level("INFO", logger="registry_service.registry")

    setting = asyncio.ensure_future(stub.SetDeployment(change(precision="bf16", max_abs_error=1e6)))
    # The proof of version 1 takes over half a second (two loads, 0.3 s of forwards at each
    # of two batch sizes); the alias moves to version 2 in the middle of it.
    await asyncio.sleep(0.3)
    assert not setting.done()
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=2))
    deployment = (await setting).deployment

    assert "moved during the proof; proving again" in caplog.text
    assert deployment.precision == "bf16" and list(deployment.placed_versions) == [1, 2]
    for version in (1, 2):  # version 2 was measured only because the write saw the move
        got = await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL, version=version))
        assert [r.reference_device for r in got.model_version.optimization_reports] == ["cpu"], version
