"""Optimisation profiles end to end, on real Redis, a real registry and real model servers: a
profile beyond the deployment's tolerance is refused at load and the copy already serving
keeps its settings; `modelyard optimize` measures every profile, records the reports in the
registry and applies the recommendation; a compiled package is reused after a restart."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from model_server.app import ModelServerApp
from model_server.repository import LoadedVersion, VersionState
from modelyard.baseline import compute_baseline
from modelyard.coordination import CoordinationStore
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli import optimize as cli_optimize
from modelyard_cli import registry as cli_registry
from registry_service.app import RegistryApp

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

MODEL = "sensitive"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 16])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
)

LaunchModelServer = Callable[..., Any]


@pytest.fixture
async def stub(registry: RegistryApp) -> AsyncIterator[RegistryServiceAsyncStub]:
    async with grpc.aio.insecure_channel(registry.address) as channel:
        yield RegistryServiceStub(channel)


@pytest.fixture
def launch_here(launch: Callable[..., Any], registry: RegistryApp) -> Callable[[], Any]:
    """Starts model servers on this test's registry (the shared `launch`)."""
    return lambda: launch(registry)


def sensitive_model() -> torch.nn.Module:
    """A linear layer whose weights span six orders of magnitude: int8 with one scale per
    tensor rounds the small ones away, so its absolute error is far above fp32 rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 16) * torch.logspace(-3, 3, 16))
    return layer.eval()


def torchscript(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def exported(module: torch.nn.Module) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (torch.randn(2, 16),), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


async def upload(
    stub: RegistryServiceAsyncStub,
    model: str,
    data: bytes,
    fmt: int,
    baselines: list[registry_pb2.InputBaseline] | None = None,
) -> None:
    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(
            metadata=pb.UploadModelVersionMetadata(
                model=model,
                format=fmt,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
                input_baselines=baselines or [],
            )
        )
        yield pb.UploadModelVersionRequest(chunk=data)

    await stub.UploadModelVersion(requests())


async def served(
    app: ModelServerApp,
    check: Callable[[LoadedVersion], bool] = lambda _: True,
    model: str = MODEL,
    timeout_s: float = 60.0,
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


async def set_deployment(
    stub: RegistryServiceAsyncStub, paths: list[str], *, skip_proof: bool = False, **fields: Any
) -> None:
    request = pb.SetDeploymentRequest(
        model=MODEL, deployment=registry_pb2.Deployment(**fields), skip_proof=skip_proof
    )
    request.update_mask.paths.extend(paths)
    await stub.SetDeployment(request)


async def cli(registry: RegistryApp, *args: str) -> tuple[int, str]:
    """Run a `modelyard` command in a thread (it runs its own event loop)."""
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    app.command(name="optimize")(cli_optimize.optimize)
    result = await asyncio.to_thread(
        CliRunner().invoke, app, [*args, "--registry", registry.address], catch_exceptions=False
    )
    return result.exit_code, result.output


async def test_a_profile_beyond_the_tolerance_is_refused_and_the_served_copy_keeps_its_settings(
    registry: RegistryApp,
    stub: RegistryServiceAsyncStub,
    launch_here: Callable[[], Any],
    store: CoordinationStore,
) -> None:
    server = await launch_here()
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL))
    baselines = compute_baseline(
        {"x": torch.randn(512, 16, generator=torch.Generator().manual_seed(3)) * 2 + 1}
    )
    await upload(
        stub, MODEL, torchscript(sensitive_model()), registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, baselines
    )
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))
    first = await served(server)
    assert first.serving.optimization == "none" and first.report is None

    # Without the registry's proof (SetDeployment would refuse the change itself:
    # test_deployment_proof.py), so that the model server's own load-time gate is what refuses.
    await set_deployment(
        stub,
        ["optimization", "max_abs_error"],
        skip_proof=True,
        optimization="int8_dynamic",
        max_abs_error=1e-3,
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while "tolerance" not in first.error:
        assert loop.time() < deadline, first.error
        await asyncio.sleep(0.05)
    assert server.repository.get(MODEL, 1) is first and first.state is VersionState.READY
    assert first.serving.optimization == "none"
    assert "int8_dynamic" in first.error and "max_abs_error 0.001" in first.error, first.error
    # The reason reaches the membership record the cluster sees.
    deadline = loop.time() + 10
    while True:
        records = [v for s in await store.list_services() for v in s.versions if v.model == MODEL]
        if records and "tolerance" in records[0].error:
            break
        assert loop.time() < deadline, records
        await asyncio.sleep(0.05)

    # What the gate measured is in the registry, even for the refused profile.
    version = (await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL, version=1))).model_version
    (report,) = version.optimization_reports
    assert (report.optimization, report.precision, report.device) == ("int8_dynamic", "fp32", "cpu")
    assert (
        report.max_abs_error > 1e-3 and report.sample == "baseline" and report.server_id == server.service_id
    )

    # A tolerance the profile meets (set from the CLI): it loads, and its report says what it
    # measured.
    code, out = await cli(registry, "deploy", "set", MODEL, "--max-abs-error", "1e6")
    assert code == 0 and "int8_dynamic" in out and "max_abs_error 1000000.0" in out, out
    second = await served(server, lambda v: v.serving.optimization == "int8_dynamic")
    assert second.report is not None and second.report.max_abs_error > 1e-3
    assert second.report.sample == "baseline" and second.report.items_per_s_max_batch > 0
    assert second.record().optimization["profile"] == "int8_dynamic"


async def test_optimize_measures_records_and_applies_the_fastest_within_tolerance(
    registry: RegistryApp,
    stub: RegistryServiceAsyncStub,
    launch_here: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_registry, "console", Console(width=200))
    server = await launch_here()
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL))
    await upload(stub, MODEL, torchscript(sensitive_model()), registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT)
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))
    await served(server)

    code, out = await cli(
        registry, "optimize", MODEL, "1", "--profiles", "none,int8_dynamic,freeze,compile",
        "--precisions", "fp32,bf16", "--max-abs-error", "1e-3", "--server", server.address, "--json",
    )  # fmt: skip
    assert code == 0, out
    answer = json.loads(out)
    bf16 = {r["optimization"]: r for r in answer["reports"] if r["precision"] == "bf16"}
    assert set(bf16) == {"none", "int8_dynamic", "freeze", "compile"}
    assert bf16["none"]["max_abs_error"] > 1e-3 and not bf16["none"]["within_tolerance"]
    assert "precision fp32" in bf16["int8_dynamic"]["error"]
    by_profile = {r["optimization"]: r for r in answer["reports"] if r["precision"] == "fp32"}
    assert by_profile["int8_dynamic"]["max_abs_error"] > 1e-3
    assert not by_profile["int8_dynamic"]["within_tolerance"]
    assert "torch.export" in by_profile["compile"]["error"]
    assert answer["recommended"] in ("none", "freeze") and answer["recommended_precision"] == "fp32"

    version = (await stub.GetModelVersion(pb.GetModelVersionRequest(model=MODEL, version=1))).model_version
    stored = {r.optimization: r for r in version.optimization_reports if r.precision == "fp32"}
    assert set(stored) == {"none", "int8_dynamic", "freeze", "compile"}
    assert len(version.optimization_reports) == 8
    assert stored["int8_dynamic"].device == "cpu" and stored["int8_dynamic"].server_id == server.service_id

    code, out = await cli(registry, "optimize", MODEL, "1", "--stored")
    assert code == 0 and "int8_dynamic" in out and "beyond tolerance" not in out, out  # no limit set
    code, out = await cli(
        registry, "optimize", MODEL, "1", "--profiles", "freeze", "--server", server.address, "--apply"
    )
    assert code == 0 and "freeze" in out, out
    got = (await stub.GetDeployment(pb.GetDeploymentRequest(model=MODEL))).deployment
    assert got.optimization == "freeze" and got.precision == ""  # only the profile was written
    audit = await stub.ListAuditEntries(pb.ListAuditEntriesRequest(model=MODEL, method="SetDeployment"))
    assert audit.entries[0].message.startswith('optimization "" -> "freeze"; placed'), audit.entries[
        0
    ].message
    await served(server, lambda v: v.serving.optimization == "freeze")


@pytest.mark.slow
# Inductor's own deepcopy of the program's pytree specs trips torch's deprecation of LeafSpec.
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
async def test_a_compiled_package_is_reused_after_a_restart(
    stub: RegistryServiceAsyncStub, launch_here: Callable[[], Any], tmp_path: Path
) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 4)).eval()
    await stub.CreateModel(pb.CreateModelRequest(name=MODEL))
    await upload(stub, MODEL, exported(module), registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT)
    await stub.SetAlias(pb.SetAliasRequest(model=MODEL, alias="production", version=1))
    # Set before any model server is up (so the first one compiles): without the proof, which
    # needs a live model server to measure on.
    await set_deployment(
        stub, ["optimization", "max_abs_error"], skip_proof=True, optimization="compile", max_abs_error=1e-4
    )

    first = await launch_here()
    loaded = await served(first, timeout_s=110)
    assert loaded.report is not None and not loaded.report.compile_cache_hit
    cache = first.repository.optimizer.cache
    assert cache is not None and (cache.misses, cache.hits) == (1, 0)
    packages = list((tmp_path / "compiled").glob("*.pt2"))
    assert len(packages) == 1 and torch.__version__ in packages[0].name
    compile_s = loaded.report.load_s
    await first.aclose()

    second = await launch_here()
    reloaded = await served(second, timeout_s=60)
    cache = second.repository.optimizer.cache
    assert cache is not None and (cache.misses, cache.hits) == (0, 1)
    assert reloaded.report is not None and reloaded.report.compile_cache_hit
    assert reloaded.report.load_s < compile_s / 2, (reloaded.report.load_s, compile_s)
    assert reloaded.report.max_abs_error <= 1e-4
