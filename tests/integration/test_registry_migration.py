"""Migration between two real clusters (each its own registry and its own Redis): export a model
with two versions and aliases, import it elsewhere, and the models answer identically; the
import is idempotent, all or nothing under kill -9, and refuses hostile bundles, storing
nothing; the CLI's export, import and migrate move the same bytes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import redis
import torch
import typer
from typer.testing import CliRunner

from modelyard.access.client import bearer
from modelyard.access.keys import new_key_token
from modelyard.settings import AccessSettings, RedisSettings, ServerSettings, load_settings
from modelyard.tls import open_channel
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli import registry as cli_registry
from modelyard_cli.embedded_redis import RedisServer
from registry_service import bundle
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings
from tests.integration.conftest import ClusterSource, LaunchModelServer

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 8])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
)


class _Padded(torch.nn.Module):
    """A linear layer with an unused buffer that makes the artifact as large as asked."""

    def __init__(self, pad_floats: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 2)
        self.register_buffer("pad", torch.zeros(pad_floats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def torchscript_artifact(seed: int, pad_floats: int = 0) -> bytes:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_Padded(pad_floats)), buffer)
    return buffer.getvalue()


def _settings(redis: RedisSettings, data_dir: Path) -> RegistrySettings:
    return load_settings(
        RegistrySettings, server=ServerSettings(port=0, drain_grace_s=1.0), redis=redis, data_dir=data_dir
    )


@pytest.fixture(scope="module")
def second_redis_url() -> Iterator[str]:
    """The target cluster's own Redis."""
    with RedisServer() as server:
        yield server.url


@pytest.fixture
async def source(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[RegistryApp]:
    app = RegistryApp(_settings(redis_settings, tmp_path / "source"))
    await app.start()
    yield app
    await app.aclose()


@pytest.fixture
async def target(second_redis_url: str, tmp_path: Path) -> AsyncIterator[RegistryApp]:
    client = redis.Redis.from_url(second_redis_url)
    client.flushdb()
    client.close()
    app = RegistryApp(
        _settings(RedisSettings(url=second_redis_url, socket_timeout_s=2.0), tmp_path / "target")
    )
    await app.start()
    yield app
    await app.aclose()


async def upload(stub: RegistryServiceAsyncStub, model: str, data: bytes) -> registry_pb2.ModelVersion:
    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(
            metadata=pb.UploadModelVersionMetadata(
                model=model,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
                labels={"team": "fraud"},
            )
        )
        for start in range(0, len(data), 1 << 20):
            yield pb.UploadModelVersionRequest(chunk=data[start : start + (1 << 20)])

    return (await stub.UploadModelVersion(requests())).model_version


async def export(stub: RegistryServiceAsyncStub, model: str, **kwargs: object) -> bytes:
    return b"".join([m.chunk async for m in stub.ExportModel(pb.ExportModelRequest(model=model, **kwargs))])


async def import_bytes(
    stub: RegistryServiceAsyncStub, data: bytes, *, with_aliases: bool = False
) -> pb.ImportModelResponse:
    async def requests() -> AsyncIterator[pb.ImportModelRequest]:
        yield pb.ImportModelRequest(options=pb.ImportModelOptions(with_aliases=with_aliases))
        for start in range(0, len(data), 64 * 1024):
            yield pb.ImportModelRequest(chunk=data[start : start + 64 * 1024])

    return await stub.ImportModel(requests())


async def download(stub: RegistryServiceAsyncStub, model: str, version: int) -> bytes:
    return b"".join(
        [
            m.chunk
            async for m in stub.DownloadModelVersion(
                pb.DownloadModelVersionRequest(model=model, version=version)
            )
        ]
    )


async def _populated_source(stub: RegistryServiceAsyncStub) -> tuple[bytes, bytes]:
    v1, v2 = torchscript_artifact(seed=0), torchscript_artifact(seed=1)
    await stub.CreateModel(pb.CreateModelRequest(name="mlp", description="two layers"))
    await upload(stub, "mlp", v1)
    await upload(stub, "mlp", v2)
    await stub.SetAlias(pb.SetAliasRequest(model="mlp", alias="production", version=1))
    await stub.SetAlias(pb.SetAliasRequest(model="mlp", alias="production", version=2, reason="better"))
    await stub.SetAlias(pb.SetAliasRequest(model="mlp", alias="fallback", version=1))
    return v1, v2


def _outputs(data: bytes, x: torch.Tensor) -> torch.Tensor:
    module = torch.jit.load(io.BytesIO(data))
    with torch.inference_mode():
        result: torch.Tensor = module(x)
    return result


async def test_two_versions_and_aliases_move_to_another_cluster_and_answer_identically(
    source: RegistryApp, target: RegistryApp
) -> None:
    async with (
        grpc.aio.insecure_channel(source.address) as a,
        grpc.aio.insecure_channel(target.address) as b,
    ):
        src, dst = RegistryServiceStub(a), RegistryServiceStub(b)
        v1, v2 = await _populated_source(src)
        # The target already has a version of its own: imported ones take the next numbers.
        await dst.CreateModel(pb.CreateModelRequest(name="mlp"))
        await upload(dst, "mlp", torchscript_artifact(seed=7))

        data = await export(src, "mlp")
        manifest = json.loads(data[512 : 512 + int(data[124:135], 8)])
        assert manifest["format"] == "modelyard-bundle" and manifest["format_version"] == 1
        assert [v["version"] for v in manifest["versions"]] == [1, 2]
        assert {a["name"]: a["version"] for a in manifest["aliases"]} == {"fallback": 1, "production": 2}
        assert [h["to_version"] for h in manifest["alias_history"] if h["alias"] == "production"] == [2, 1]
        assert "replicas" in manifest["deployment"]

        response = await import_bytes(dst, data, with_aliases=True)
        assert response.source_cluster == manifest["source_cluster"] != ""
        assert [(v.source_version, v.model_version.version, v.created) for v in response.versions] == [
            (1, 2, True),
            (2, 3, True),
        ]
        assert {(a.alias, a.version, a.moved_by) for a in response.aliases} == {
            ("fallback", 2, "set"),
            ("production", 3, "set"),
        }
        imported = (
            await dst.GetModelVersion(pb.GetModelVersionRequest(model="mlp", version=3))
        ).model_version
        assert imported.origin == registry_pb2.VersionOrigin(
            source_cluster=manifest["source_cluster"],
            source_version=2,
            source_sha256=hashlib.sha256(v2).hexdigest(),
        )
        assert dict(imported.labels) == {"team": "fraud"} and imported.signature == SIGNATURE
        uploaded_here = (
            await dst.GetModelVersion(pb.GetModelVersionRequest(model="mlp", version=1))
        ).model_version
        assert not uploaded_here.HasField("origin")

        # Same bytes, and the same answers from torch.
        x = torch.randn(16, 8)
        for src_version, dst_version, original in ((1, 2, v1), (2, 3, v2)):
            moved = await download(dst, "mlp", dst_version)
            assert moved == original == await download(src, "mlp", src_version)
            assert torch.equal(_outputs(moved, x), _outputs(original, x))
        model = (await dst.GetModel(pb.GetModelRequest(name="mlp"))).model
        assert {a.name: a.version for a in model.aliases} == {"fallback": 2, "production": 3}
        history = await dst.ListAliasHistory(pb.ListAliasHistoryRequest(model="mlp"))
        assert all("imported from cluster" in e.reason for e in history.entries)

        # Idempotent: the same bundle again records nothing and moves nothing.
        epoch = (await dst.GetDeployment(pb.GetDeploymentRequest(model="mlp"))).deployment.epoch
        again = await import_bytes(dst, data, with_aliases=True)
        assert [(v.model_version.version, v.created) for v in again.versions] == [(2, False), (3, False)]
        assert {a.moved_by for a in again.aliases} == {"unchanged"}
        after = (await dst.GetModel(pb.GetModelRequest(name="mlp"))).model
        after_epoch = (await dst.GetDeployment(pb.GetDeploymentRequest(model="mlp"))).deployment.epoch
        assert (after.latest_version, after_epoch) == (3, epoch)

        audit = await src.ListAuditEntries(pb.ListAuditEntriesRequest(method="ExportModel"))
        assert audit.entries[0].outcome == "OK" and "versions [1, 2]" in audit.entries[0].message
        audit = await dst.ListAuditEntries(pb.ListAuditEntriesRequest(method="ImportModel"))
        assert [e.model for e in audit.entries] == ["mlp", "mlp"]
        assert "v1 -> v2, v2 -> v3" in audit.entries[1].message

        # One alias carries only what it points at.
        only = await export(src, "mlp", aliases=["fallback"])
        assert [v["version"] for v in json.loads(only[512 : 512 + int(only[124:135], 8)])["versions"]] == [1]


async def test_with_aliases_moves_by_the_zero_downtime_promote_when_a_model_server_runs(
    redis_settings: RedisSettings,
    second_redis_url: str,
    tmp_path: Path,
    cluster_source: ClusterSource,
    launch_model_server: LaunchModelServer,
) -> None:
    # Here the target is the cluster with the model server (on the session's Redis).
    client = redis.Redis.from_url(second_redis_url)
    client.flushdb()
    client.close()
    source_app = RegistryApp(_settings(RedisSettings(url=second_redis_url), tmp_path / "source"))
    target_app = RegistryApp(_settings(redis_settings, tmp_path / "target"))
    await source_app.start()
    await target_app.start()
    try:
        async with (
            grpc.aio.insecure_channel(source_app.address) as a,
            grpc.aio.insecure_channel(target_app.address) as b,
        ):
            src, dst = RegistryServiceStub(a), RegistryServiceStub(b)
            _, v2 = await _populated_source(src)
            data = await export(src, "mlp", aliases=["production"])
            # What the target's model server will load as its version 1 (the import's number).
            cluster_source.add("mlp", 1, torch.jit.load(io.BytesIO(v2)), SIGNATURE)
            await launch_model_server()
            response = await import_bytes(dst, data, with_aliases=True)
            assert [(a.alias, a.version, a.moved_by) for a in response.aliases] == [
                ("production", 1, "promote")
            ]
            history = await dst.ListAliasHistory(pb.ListAliasHistoryRequest(model="mlp"))
            assert [e.kind for e in history.entries] == [registry_pb2.ALIAS_MOVE_KIND_PROMOTE]
    finally:
        await target_app.aclose()
        await source_app.aclose()


# -- hostile bundles ---------------------------------------------------------------------------


def _member(name: str, data: bytes, *, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = link
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    body = data if kind == tarfile.REGTYPE else b""
    return header + body + bundle.padding(len(body))


def _bundle(manifest: dict[str, object], members: list[bytes]) -> bytes:
    body = json.dumps(manifest).encode()
    return _member(bundle.MANIFEST_NAME, body) + b"".join(members) + bundle.end_of_archive()


def _parts(data: bytes) -> tuple[dict[str, object], dict[str, bytes]]:
    """A valid bundle's manifest and artifacts, read with tarfile (interoperability)."""
    artifacts: dict[str, bytes] = {}
    manifest: dict[str, object] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        for info in archive:
            content = archive.extractfile(info)
            assert content is not None and info.isreg()
            if info.name == bundle.MANIFEST_NAME:
                manifest = json.loads(content.read())
            else:
                artifacts[info.name] = content.read()
    return manifest, artifacts


def _hostile(valid: bytes, case: str) -> bytes:
    manifest, artifacts = _parts(valid)
    members = [_member(name, data) for name, data in artifacts.items()]
    (name, data), *_ = artifacts.items()
    versions = manifest["versions"]
    assert isinstance(versions, list)
    if case == "flipped_byte":
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        return _bundle(manifest, [_member(name, bytes(flipped)), *members[1:]])
    if case == "truncated":
        return valid[: len(valid) - 3000]
    if case == "truncated_in_header":
        return valid[: 512 + 512 * ((len(json.dumps(manifest)) + 511) // 512) + 100]
    if case == "hash_lie":
        # The manifest and the member name agree on a hash the bytes do not have.
        fake = hashlib.sha256(b"something else").hexdigest()
        text = json.dumps(manifest).replace(name.removeprefix("artifacts/"), fake)
        return _bundle(json.loads(text), [_member("artifacts/" + fake, data), *members[1:]])
    if case == "size_lie":
        for v in versions:
            v["size_bytes"] += 1
        for a in manifest["artifacts"]:  # type: ignore[attr-defined]
            a["size_bytes"] += 1
        return _bundle(manifest, members)
    if case == "dotdot":
        return _bundle(manifest, [_member("artifacts/../../etc/cron.d/x", b"boom"), *members])
    if case == "absolute":
        return _bundle(manifest, [_member("/etc/passwd", b"boom"), *members])
    if case == "symlink":
        return _bundle(manifest, [_member(name, b"", kind=tarfile.SYMTYPE, link="/etc/passwd"), *members[1:]])
    if case == "hardlink":
        return _bundle(
            manifest, [_member(name, b"", kind=tarfile.LNKTYPE, link="manifest.json"), *members[1:]]
        )
    if case == "unknown_member":
        return _bundle(manifest, [*members, _member("notes.txt", b"hello")])
    if case == "data_after_end":
        return valid + _member("notes.txt", b"smuggled")
    if case == "missing_artifact":
        return _bundle(manifest, members[1:])
    if case == "oversize_manifest":
        info = tarfile.TarInfo(bundle.MANIFEST_NAME)
        info.size = bundle.MAX_MANIFEST_BYTES + 1
        return info.tobuf(format=tarfile.USTAR_FORMAT) + b"{" * 4096
    if case == "unsafe_artifact":
        pickled = io.BytesIO()
        torch.save({"weights": torch.zeros(2)}, pickled)
        evil = pickled.getvalue()
        sha = hashlib.sha256(evil).hexdigest()
        text = json.dumps(manifest).replace(name.removeprefix("artifacts/"), sha)
        text = text.replace(f'"size_bytes": {len(data)}', f'"size_bytes": {len(evil)}')
        return _bundle(json.loads(text), [_member("artifacts/" + sha, evil), *members[1:]])
    raise AssertionError(case)


HOSTILE = {
    "flipped_byte": "CHECKSUM_MISMATCH",
    "truncated": "BUNDLE_INVALID",
    "truncated_in_header": "BUNDLE_INVALID",
    "hash_lie": "CHECKSUM_MISMATCH",
    "size_lie": "BUNDLE_INVALID",
    "dotdot": "BUNDLE_INVALID",
    "absolute": "BUNDLE_INVALID",
    "symlink": "BUNDLE_INVALID",
    "hardlink": "BUNDLE_INVALID",
    "unknown_member": "BUNDLE_INVALID",
    "missing_artifact": "BUNDLE_INVALID",
    "data_after_end": "BUNDLE_INVALID",
    "oversize_manifest": "TOO_LARGE",
    "unsafe_artifact": "UNSAFE_ARTIFACT",
}


def _reason(exc: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info.reason
    return ""


async def test_hostile_bundles_are_refused_with_a_precise_status_and_nothing_is_stored(
    source: RegistryApp, target: RegistryApp, tmp_path: Path
) -> None:
    async with (
        grpc.aio.insecure_channel(source.address) as a,
        grpc.aio.insecure_channel(target.address) as b,
    ):
        src, dst = RegistryServiceStub(a), RegistryServiceStub(b)
        await _populated_source(src)
        valid = await export(src, "mlp")
        store = tmp_path / "target" / "artifacts"
        for case, reason in HOSTILE.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await import_bytes(dst, _hostile(valid, case))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, caught.value.details())
            assert _reason(caught.value) == reason, (case, caught.value.details())
            assert "nothing was stored" in (caught.value.details() or ""), case
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await dst.GetModel(pb.GetModelRequest(name="mlp"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND, case
            assert [p for p in (store / "sha256").rglob("*") if p.is_file()] == [], case
            assert list((store / "tmp").iterdir()) == [], case
        # The untouched bundle still imports.
        assert len((await import_bytes(dst, valid)).versions) == 2


# -- kill -9 mid-import ------------------------------------------------------------------------


async def _wait_for_address(log_path: Path, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        found = re.search(r"serving on (\S+:\d+)", log_path.read_text(errors="replace"))
        if found:
            return found.group(1)
        assert proc.poll() is None, f"the registry exited early:\n{log_path.read_text()}"
        await asyncio.sleep(0.05)
    raise AssertionError(f"the registry did not start in time:\n{log_path.read_text()}")


async def test_kill_9_mid_import_leaves_no_partial_version(
    source: RegistryApp, second_redis_url: str, tmp_path: Path
) -> None:
    # Two 4 MiB versions: the kill lands after the first artifact is staged, in the second.
    async with grpc.aio.insecure_channel(source.address) as a:
        src = RegistryServiceStub(a)
        await src.CreateModel(pb.CreateModelRequest(name="big"))
        await upload(src, "big", torchscript_artifact(seed=0, pad_floats=1 << 20))
        await upload(src, "big", torchscript_artifact(seed=1, pad_floats=1 << 20))
        data = await export(src, "big")
    data_dir = tmp_path / "victim"
    log_path = tmp_path / "victim.log"
    env = {
        **os.environ,
        "MODELYARD_REGISTRY_DATA_DIR": str(data_dir),
        "MODELYARD_REGISTRY_SERVER__PORT": "0",
        "MODELYARD_REGISTRY_REDIS__URL": second_redis_url,
        "MODELYARD_LOG_LEVEL": "INFO",
    }
    cut = len(data) - (2 << 20)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "registry_service"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        address = await _wait_for_address(log_path, proc)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = RegistryServiceStub(channel)

            async def most_then_stall() -> AsyncIterator[pb.ImportModelRequest]:
                yield pb.ImportModelRequest(options=pb.ImportModelOptions(with_aliases=True))
                for start in range(0, cut, 64 * 1024):
                    yield pb.ImportModelRequest(chunk=data[start : min(cut, start + 64 * 1024)])
                await asyncio.Event().wait()

            call = stub.ImportModel(most_then_stall())
            tmp_dir = data_dir / "artifacts" / "tmp"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            # Both staged files exist once the second artifact has started arriving.
            while len([p for p in tmp_dir.glob("*") if p.stat().st_size > 0]) < 2:
                assert loop.time() < deadline, "the import never reached the registry's disk"
                await asyncio.sleep(0.02)
            proc.kill()
            proc.wait()
            with pytest.raises(grpc.aio.AioRpcError):
                await call
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9

    app = RegistryApp(_settings(RedisSettings(url=second_redis_url, socket_timeout_s=2.0), data_dir))
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = RegistryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetModel(pb.GetModelRequest(name="big"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
            artifacts = data_dir / "artifacts"
            assert list((artifacts / "tmp").iterdir()) == []
            assert [p for p in (artifacts / "sha256").rglob("*") if p.is_file()] == []
            # The whole bundle imports afterwards, numbered from 1.
            response = await import_bytes(stub, data)
            assert [v.model_version.version for v in response.versions] == [1, 2]
    finally:
        await app.aclose()


# -- the CLI -----------------------------------------------------------------------------------


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    return app


async def _run(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, _cli(), list(args), catch_exceptions=False)
    return result.exit_code, result.output


async def test_cli_export_import_and_migrate(
    source: RegistryApp, target: RegistryApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    async with (
        grpc.aio.insecure_channel(source.address) as a,
        grpc.aio.insecure_channel(target.address) as b,
    ):
        src, dst = RegistryServiceStub(a), RegistryServiceStub(b)
        await _populated_source(src)
        out = tmp_path / "mlp.bundle"
        code, output = await _run(
            "models", "export", "mlp", "--version", "2", "-o", str(out), "--registry", source.address
        )
        assert code == 0, output
        # The same artifacts as the RPC exports (the manifests differ only in their time).
        assert _parts(out.read_bytes())[1] == _parts(await export(src, "mlp", versions=[2]))[1]
        code, output = await _run("models", "import", str(out), "--registry", target.address)
        assert code == 0, output
        assert "1 version(s) created" in output
        assert (await dst.GetModel(pb.GetModelRequest(name="mlp"))).model.aliases == []

        code, output = await _run(
            "models", "migrate", "mlp", "--registry", source.address, "--to", target.address, "--with-aliases"
        )
        assert code == 0, output
        # Version 2 came with the file already: only version 1 is new.
        assert "1 version(s) created, 1 already there" in output
        model = (await dst.GetModel(pb.GetModelRequest(name="mlp"))).model
        assert {a.name: a.version for a in model.aliases} == {"fallback": 2, "production": 1}

        damaged = bytearray(out.read_bytes())
        damaged[-2000] ^= 0xFF
        (tmp_path / "bad.bundle").write_bytes(bytes(damaged))
        code, output = await _run(
            "models", "import", str(tmp_path / "bad.bundle"), "--registry", target.address
        )
        assert code == 1 and "INVALID_ARGUMENT" in output


# -- access control ----------------------------------------------------------------------------


async def test_with_access_on_export_and_import_need_the_admin_grant(
    redis_settings: RedisSettings, tmp_path: Path
) -> None:
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(b"s" * 32)
    _, admin_token = new_key_token()
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
            access=AccessSettings(mode="enforce", service_secret_file=secret),
            admin_key=admin_token,
        )
    )
    await app.start()
    try:
        assert app.keys is not None
        _, alice_token = await app.keys.create(
            "alice", ["registry.read:*", "registry.write:*", "alias.move:*"]
        )
        async with (
            open_channel(app.address, None, interceptors=bearer(admin_token), client="cli") as a,
            open_channel(app.address, None, interceptors=bearer(alice_token), client="cli") as b,
        ):
            admin, alice = RegistryServiceStub(a), RegistryServiceStub(b)
            await admin.CreateModel(pb.CreateModelRequest(name="mlp"))
            await upload(admin, "mlp", torchscript_artifact(seed=0))
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await export(alice, "mlp")
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            data = await export(admin, "mlp")
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await import_bytes(alice, data)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # A bundle back into its own cluster (a restore) is a copy, numbered after the rest.
            response = await import_bytes(admin, data)
            assert [(v.model_version.version, v.created) for v in response.versions] == [(2, True)]
            audit = await admin.ListAuditEntries(pb.ListAuditEntriesRequest(method="ImportModel"))
            assert [(e.actor, e.outcome) for e in audit.entries] == [
                ("key:admin", "OK"),
                ("key:alice", "PERMISSION_DENIED"),
            ]
    finally:
        await app.aclose()
