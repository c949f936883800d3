"""The malicious-artifact corpus against a real registry and a real model server (port 0, real
Redis): every attack is refused at upload with INVALID_ARGUMENT naming its member and nothing
stored; planted in the store (the file written under its sha256 and the version row edited on
disk, as an attacker with the disk or a store from before the inspection would), every one is
refused by the model server before any torch loader runs, and the version goes FAILED with the
reason. A marker file proves that no payload ran. Real TorchScript and torch.export models still
upload and serve."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from model_server.app import ModelServerApp
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as reg
from registry_service.app import RegistryApp
from tests.artifact_corpus import (
    CORPUS,
    TORCH_EXPORT,
    TORCHSCRIPT,
    TinyNet,
    export_archive,
    torchscript_archive,
)
from tests.integration import test_model_server as base
from tests.integration.test_model_server import failure
from tests.integration.test_registry import error_info

pytestmark = pytest.mark.integration

# The model server test module's fixtures, shared by name.
registry = base.registry
start_model_server = base.start_model_server
channels = base.channels
registry_stub = base.registry_stub
model_server = base.model_server
stub = base.stub

MODEL = "mlp"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3])],
)
FORMAT_NAME = {TORCHSCRIPT: "torchscript", TORCH_EXPORT: "torch_export"}


async def upload_requests(
    data: bytes, fmt: int, *, model: str = MODEL, extra: dict[str, Any] | None = None
) -> AsyncIterator[reg.UploadModelVersionRequest]:
    yield reg.UploadModelVersionRequest(
        metadata=reg.UploadModelVersionMetadata(
            model=model,
            format=fmt,  # type: ignore[arg-type]
            sha256=hashlib.sha256(data).hexdigest(),
            signature=SIGNATURE,
            **(extra or {}),
        )
    )
    for start in range(0, len(data), 1 << 20):
        yield reg.UploadModelVersionRequest(chunk=data[start : start + (1 << 20)])


async def upload(registry_stub: Any, data: bytes, fmt: int, **kw: Any) -> int:
    response = await registry_stub.UploadModelVersion(upload_requests(data, fmt, **kw))
    return int(response.model_version.version)


def stored_artifacts(registry: RegistryApp) -> set[str]:
    root = registry.settings.resolved_artifacts_dir / "sha256"
    return {path.name for path in root.rglob("*") if path.is_file()}


def plant(registry: RegistryApp, model: str, version: int, data: bytes, fmt: int) -> None:
    """Put `data` in the registry's store as `version`'s artifact, the way someone with the disk
    would: the file under its sha256, and the version row pointed at it."""
    sha256 = hashlib.sha256(data).hexdigest()
    path = registry.settings.resolved_artifacts_dir / "sha256" / sha256[:2] / sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with contextlib.closing(sqlite3.connect(registry.settings.resolved_database_path)) as db, db:
        db.execute(
            "UPDATE versions SET sha256 = ?, size_bytes = ?, format = ? WHERE model = ? AND version = ?",
            (sha256, len(data), FORMAT_NAME[fmt], model, version),
        )


async def wait_for_version(stub: Any, model: str, version: int, state: int, timeout_s: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        status = await stub.GetServerStatus(ms.GetServerStatusRequest())
        for held in status.loaded_versions:
            if held.model == model and held.version == version and held.state == state:
                return held
        if loop.time() > end:
            raise AssertionError(f"{model} v{version} never reached state {state}: {status}")
        await asyncio.sleep(0.05)


async def test_every_attack_is_refused_at_upload_with_nothing_stored_and_nothing_run(
    registry: RegistryApp, registry_stub: Any, tmp_path: Path
) -> None:
    await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL))
    for name, attack in CORPUS.items():
        marker = tmp_path / f"marker-{len(name)}-{abs(hash(name))}"
        err = await failure(upload(registry_stub, attack.build(marker), attack.format))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.details())
        assert error_info(err).reason == "UNSAFE_ARTIFACT", (name, err.details())
        assert attack.member in (err.details() or ""), (name, err.details())
        assert len(err.details() or "") <= 1000
        assert not marker.exists(), name
        assert stored_artifacts(registry) == set(), name
    listed = await registry_stub.ListModelVersions(reg.ListModelVersionsRequest(model=MODEL))
    assert list(listed.model_versions) == []
    audit = await registry_stub.ListAuditEntries(reg.ListAuditEntriesRequest(model=MODEL, page_size=100))
    refused = [e for e in audit.entries if e.method == "UploadModelVersion"]
    assert len(refused) == len(CORPUS) and {e.error_reason for e in refused} == {"UNSAFE_ARTIFACT"}


async def test_every_attack_planted_in_the_store_is_refused_at_load_and_nothing_runs(
    registry: RegistryApp, registry_stub: Any, model_server: ModelServerApp, stub: Any, tmp_path: Path
) -> None:
    await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL))
    benign = {TORCHSCRIPT: torchscript_archive(), TORCH_EXPORT: export_archive()}
    markers = []
    for name, attack in CORPUS.items():
        marker = tmp_path / f"marker-{len(markers)}"
        markers.append(marker)
        version = await upload(registry_stub, benign[attack.format], attack.format)
        plant(registry, MODEL, version, attack.build(marker), attack.format)
        await registry_stub.SetAlias(reg.SetAliasRequest(model=MODEL, alias="production", version=version))
        held = await wait_for_version(stub, MODEL, version, ms.VERSION_STATE_FAILED)
        assert "refusing to load it" in held.error, (name, held.error)
        assert attack.member in held.error, (name, held.error)
        assert not marker.exists(), name
    assert not any(marker.exists() for marker in markers)


async def test_real_torchscript_and_exported_programs_still_upload_and_serve(
    registry_stub: Any, stub: Any
) -> None:
    await registry_stub.CreateModel(reg.CreateModelRequest(name=MODEL))
    x = torch.randn(5, 4)
    with torch.inference_mode():
        expected = TinyNet().eval()(x)
    for data, fmt in ((torchscript_archive(), TORCHSCRIPT), (export_archive(), TORCH_EXPORT)):
        version = await upload(registry_stub, data, fmt)
        await registry_stub.SetAlias(reg.SetAliasRequest(model=MODEL, alias="production", version=version))
        await wait_for_version(stub, MODEL, version, ms.VERSION_STATE_READY)
        response = await stub.Infer(
            ms.InferRequest(model=MODEL, version=version, inputs=[tensor_to_proto("input", x)])
        )
        torch.testing.assert_close(tensor_from_proto(response.outputs[0]), expected)
    assert registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT == TORCH_EXPORT
