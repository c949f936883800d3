"""`modelyard models upload --baseline-sample` against a real registry on port 0: the sample's
statistics are recorded with the version; a file that is not tensors is refused before upload."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli import registry as cli_registry
from registry_service.app import RegistryApp

pytestmark = pytest.mark.integration


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    return app


async def run(registry: RegistryApp, *args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(
        CliRunner().invoke, cli(), [*args, "--registry", registry.address], catch_exceptions=False
    )
    return result.exit_code, result.output


async def test_upload_records_the_baseline_of_a_sample_file(
    registry: RegistryApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_registry, "console", Console(width=240))
    artifact = tmp_path / "model.pt"
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 2))), buffer)
    artifact.write_bytes(buffer.getvalue())
    sample = tmp_path / "sample.pt"
    torch.save(torch.randn(300, 4, generator=torch.Generator().manual_seed(0)) + 2.0, sample)
    spec = ["--input", "x:fp32:-1,4", "--output", "y:fp32:-1,2"]

    code, out = await run(registry, "models", "create", "demo")
    assert code == 0, out
    code, out = await run(
        registry,
        "models",
        "upload",
        "demo",
        str(artifact),
        *spec,
        "--baseline-sample",
        str(sample),
        "--bins",
        "5",
    )
    assert code == 0 and "baseline of x: 4 features over 300 items" in out, out

    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub: Any = RegistryServiceStub(channel)
        version = (
            await stub.GetModelVersion(reg.GetModelVersionRequest(model="demo", version=1))
        ).model_version
    (baseline,) = version.input_baselines
    assert baseline.input == "x" and baseline.item_count == 300
    assert all(f.mean == pytest.approx(2.0, abs=0.2) and len(f.bin_fractions) == 5 for f in baseline.features)

    # Anything but tensors is refused (weights_only), and nothing is uploaded.
    pickled = tmp_path / "pickled.pt"
    torch.save({"x": Path("/etc/passwd")}, pickled)
    code, out = await run(
        registry, "models", "upload", "demo", str(artifact), *spec, "--baseline-sample", str(pickled)
    )
    assert code != 0 and "not a torch.save'd tensor" in re.sub(r"[\s│╭╮╰╯─]+", " ", out), out
    async with grpc.aio.insecure_channel(registry.address) as channel:
        stub = RegistryServiceStub(channel)
        listed = (await stub.ListModelVersions(reg.ListModelVersionsRequest(model="demo"))).model_versions
    assert [v.version for v in listed] == [1]
