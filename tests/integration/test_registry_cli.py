"""The registry CLI (`modelyard models | alias | deploy | audit`) against a real registry on
port 0 and a real Redis: tables for people, JSON for scripts, clear failures."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from modelyard import cli_registry
from modelyard.settings import RedisSettings, ServerSettings, SigningSettings, load_settings
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings
from tests.signing_kit import KeySigner

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[RegistryApp]:
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
        )
    )
    await app.start()
    yield app
    await app.aclose()


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    return app


async def run(registry: RegistryApp, *args: str) -> tuple[int, str]:
    """Run a CLI command in a thread (it runs its own event loop) against `registry`."""
    result = await asyncio.to_thread(
        CliRunner().invoke, cli(), [*args, "--registry", registry.address], catch_exceptions=False
    )
    return result.exit_code, result.output


def torchscript_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 2))), buffer)
    path.write_bytes(buffer.getvalue())
    return path


async def test_models_alias_deploy_and_audit_commands(
    registry: RegistryApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wide enough that the tables are not cut to the runner's 80 columns.
    monkeypatch.setattr(cli_registry, "console", Console(width=240))
    spec = ["--input", "x:fp32:-1,4", "--output", "y:fp32:-1,2"]
    code, out = await run(registry, "models", "create", "demo", "--description", "tiny")
    assert code == 0 and "created model demo" in out, out
    for seed in (1, 2):
        code, out = await run(
            registry, "models", "upload", "demo", str(torchscript_file(tmp_path / f"{seed}.pt", seed)), *spec
        )
        assert code == 0 and f"version {seed}" in out, out

    code, out = await run(registry, "alias", "set", "demo", "production", "1", "--expect", "0")
    assert code == 0 and "production" in out, out
    code, out = await run(
        registry, "alias", "set", "demo", "production", "2", "--expect", "1", "--reason", "better"
    )
    assert code == 0, out
    code, out = await run(registry, "alias", "set", "demo", "production", "1", "--expect", "1")
    assert code == 1 and "ABORTED" in out, out
    code, out = await run(registry, "alias", "rollback", "demo", "production")
    assert code == 0 and "→ 1" in out, out

    code, out = await run(registry, "alias", "history", "demo", "--json")
    entries = json.loads(out)["entries"]
    assert [(e.get("from_version", "0"), e["to_version"]) for e in entries] == [
        ("2", "1"),
        ("1", "2"),
        ("0", "1"),
    ]

    code, out = await run(
        registry, "deploy", "set", "demo", "--pin", "2", "--split", "production=100", "--precision", "bf16"
    )
    assert code == 0 and "bf16" in out, out
    code, out = await run(registry, "deploy", "set", "demo", "--split", "production=90")
    assert code == 1 and "INVALID_ARGUMENT" in out and "sum" in out, out
    code, out = await run(registry, "deploy", "show", "demo", "--json")
    deployment = json.loads(out)["deployment"]
    assert deployment["placed_versions"] == ["1", "2"] and deployment["pinned_versions"] == ["2"]

    code, out = await run(registry, "models", "list")
    assert code == 0 and "demo" in out and "production→1" in out, out
    code, out = await run(registry, "models", "versions", "demo")
    assert code == 0 and "active" in out, out
    code, out = await run(registry, "models", "show", "demo")
    assert code == 0 and "placed versions" in out, out
    code, out = await run(registry, "models", "archive", "demo", "2")
    assert code == 1 and "FAILED_PRECONDITION" in out, out

    code, out = await run(registry, "audit", "--method", "CreateModel", "--json")
    assert [e["method"] for e in json.loads(out)["entries"]] == ["CreateModel"]
    code, out = await run(registry, "audit", "--model", "demo")
    assert code == 0 and "ABORTED" in out and "SetDeployment" in out, out


async def test_a_signed_upload_to_a_model_that_requires_signatures(
    redis_settings: RedisSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_registry, "console", Console(width=240))
    signer = KeySigner.create(tmp_path / "keys", "team")
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
            signing=SigningSettings(trusted_public_keys=(signer.public_key,)),
        )
    )
    await app.start()
    try:
        spec = ["--input", "x:fp32:-1,4", "--output", "y:fp32:-1,2"]
        code, out = await run(app, "models", "create", "signed", "--require-signature")
        assert code == 0, out
        artifact = torchscript_file(tmp_path / "model.pt", 0)
        code, out = await run(app, "models", "upload", "signed", str(artifact), *spec)
        assert code == 1 and "the version is unsigned" in out, out
        bundle = tmp_path / "model.pt.sig"
        bundle.write_bytes(signer.sign(artifact.read_bytes(), tmp_path / "signing"))
        code, out = await run(
            app, "models", "upload", "signed", str(artifact), *spec, "--model-signature", str(bundle)
        )
        assert code == 0 and "signed by key " in out, out
        code, out = await run(app, "models", "versions", "signed", "--json")
        assert code == 0 and json.loads(out)["model_versions"][0]["signer"].startswith("key "), out
    finally:
        await app.aclose()
