"""The registry CLI (`modelyard models | alias | deploy | audit`) against a real registry on
port 0 and a real Redis: tables for people, JSON for scripts, clear failures."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
import torch
import typer
from rich.console import Console
from typer.testing import CliRunner

from modelyard.settings import RedisSettings, ServerSettings, SigningSettings, load_settings
from modelyard_cli import registry as cli_registry
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings
from tests.signing_kit import KeySigner

pytestmark = pytest.mark.integration


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


async def test_deploy_set_changes_only_the_settings_given_and_the_history_tells_the_story(
    registry: RegistryApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_registry, "console", Console(width=300))
    spec = ["--input", "x:fp32:-1,4", "--output", "y:fp32:-1,2"]
    assert (await run(registry, "models", "create", "demo"))[0] == 0
    for seed in (1, 2):
        path = str(torchscript_file(tmp_path / f"{seed}.pt", seed))
        assert (await run(registry, "models", "upload", "demo", path, *spec))[0] == 0
    assert (await run(registry, "alias", "set", "demo", "production", "1"))[0] == 0
    assert (await run(registry, "alias", "set", "demo", "canary", "2"))[0] == 0

    async def deployment() -> dict[str, object]:
        code, out = await run(registry, "deploy", "show", "demo", "--json")
        assert code == 0, out
        got: dict[str, object] = json.loads(out)["deployment"]
        return got

    code, out = await run(
        registry,
        "deploy",
        "set",
        "demo",
        "--split",
        "production=90",
        "--split",
        "canary=10",
        "--replicas",
        "2",
    )
    assert code == 0, out
    # Adding a shadow keeps the split (the trap: it used to wipe it).
    code, out = await run(registry, "deploy", "set", "demo", "--shadow", "canary", "--shadow-fraction", "0.5")
    assert code == 0, out
    got = await deployment()
    assert got["traffic_split"] == {"production": 90, "canary": 10} and got["replicas"] == 2
    assert (got["shadow_alias"], got["shadow_fraction"]) == ("canary", 0.5)
    # '' clears: the split, and the shadow with its fraction.
    code, out = await run(registry, "deploy", "set", "demo", "--split", "", "--shadow", "")
    assert code == 0, out
    got = await deployment()
    assert "traffic_split" not in got and "shadow_alias" not in got and got["replicas"] == 2
    code, out = await run(registry, "deploy", "set", "demo", "--reset", "replicas")
    assert code == 0 and "replicas" not in await deployment(), out
    code, out = await run(registry, "deploy", "set", "demo", "--reset", "traffic_splits")
    assert code == 1 and "INVALID_ARGUMENT" in out and "not a Deployment field" in out, out
    code, out = await run(registry, "deploy", "set", "demo")
    assert code == 2 and "nothing to change" in out, out
    code, out = await run(registry, "deploy", "set", "demo", "--precision", "bf16", "--replace")
    assert code == 0, out

    code, out = await run(registry, "audit", "--method", "SetDeployment", "--json")
    entries = json.loads(out)["entries"]
    assert [e["outcome"] for e in entries] == ["OK", "INVALID_ARGUMENT", "OK", "OK", "OK", "OK"]
    assert [e["message"].split("; placed versions")[0] for e in entries if e["outcome"] == "OK"] == [
        'precision "" -> "bf16"',
        "replicas 2 -> 0",
        'traffic_split {canary: 10, production: 90} -> {}; shadow_alias "canary" -> ""; '
        "shadow_fraction 0.5 -> 0",
        'shadow_alias "" -> "canary"; shadow_fraction 0 -> 0.5',
        "replicas 0 -> 2; traffic_split {} -> {canary: 10, production: 90}",
    ]
    assert entries[1]["target"] == "deployment [traffic_splits]"

    # Typed moves, in the history table and as a filter; the CLI's calls claim "cli".
    assert (await run(registry, "alias", "set", "demo", "canary", "1", "--kind", "canary-rollback"))[0] == 0
    assert (await run(registry, "alias", "rollback", "demo", "canary"))[0] == 0
    code, out = await run(registry, "alias", "history", "demo", "canary")
    assert code == 0, out
    kinds = [line.split("│")[3].strip() for line in out.splitlines() if line.startswith("│")]
    assert kinds == ["rollback", "canary-rollback", "set"], out
    assert "cli (claimed; access control off) at" in out, out
    code, out = await run(registry, "alias", "history", "demo", "--kind", "rollback", "--json")
    entries = json.loads(out)["entries"]
    assert [(e["alias"], e["kind"]) for e in entries] == [("canary", "ALIAS_MOVE_KIND_ROLLBACK")]
    code, out = await run(registry, "alias", "history", "demo", "--kind", "sideways")
    assert code == 2 and "canary-rollback" in out, out
    code, out = await run(registry, "audit", "--actor", "cli", "--json")
    assert code == 0 and len(json.loads(out)["entries"]) >= 10, out


def test_expected_epoch_help_points_at_deploy_show() -> None:
    result = CliRunner().invoke(cli(), ["deploy", "set", "--help"], env={"COLUMNS": "400"})
    text = " ".join(result.output.replace("│", " ").split())  # the help's box, unwrapped
    assert "model's epoch (`modelyard deploy show`) is still this one" in text, text
    assert "deploy get" not in text
