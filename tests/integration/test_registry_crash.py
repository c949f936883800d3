"""kill -9 of a registry process (`python -m registry_service`) in the middle of an upload:
after a restart no partial version exists, nothing half-written is kept, and what was
committed before the kill is intact."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
import torch

from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

if TYPE_CHECKING:  # the async stub exists only in the typing stubs
    from modelyard.v1.registry_service_pb2_grpc import RegistryServiceAsyncStub

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK_BYTES = 64 * 1024
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 8])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
)


def torchscript_artifact(seed: int) -> bytes:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(8, 2)), buffer)
    return buffer.getvalue()


async def upload(stub: RegistryServiceAsyncStub, model: str, data: bytes) -> registry_pb2.ModelVersion:
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

    return (await stub.UploadModelVersion(requests())).model_version


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


async def _wait_for_partial_upload(tmp_dir: Path, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if any(p.stat().st_size >= 1024 * 1024 for p in tmp_dir.glob("*")):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the upload never reached the registry's disk")


async def test_kill_9_mid_upload_leaves_no_partial_version(
    redis_settings: RedisSettings, tmp_path: Path
) -> None:
    data_dir = tmp_path / "registry"
    log_path = tmp_path / "registry.log"
    env = {
        **os.environ,
        "MODELYARD_REGISTRY_DATA_DIR": str(data_dir),
        "MODELYARD_REGISTRY_SERVER__PORT": "0",
        "MODELYARD_REGISTRY_REDIS__URL": redis_settings.url,
        "MODELYARD_LOG_LEVEL": "INFO",
    }
    committed = torchscript_artifact(seed=0)
    doomed = os.urandom(3 * 1024 * 1024)
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
            await stub.CreateModel(pb.CreateModelRequest(name="mlp"))
            await upload(stub, "mlp", committed)

            async def two_thirds_then_stall() -> AsyncIterator[pb.UploadModelVersionRequest]:
                yield pb.UploadModelVersionRequest(
                    metadata=pb.UploadModelVersionMetadata(
                        model="mlp",
                        format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                        sha256=hashlib.sha256(doomed).hexdigest(),
                        signature=SIGNATURE,
                    )
                )
                for start in range(0, 2 * 1024 * 1024, CHUNK_BYTES):
                    yield pb.UploadModelVersionRequest(chunk=doomed[start : start + CHUNK_BYTES])
                await asyncio.Event().wait()

            call = stub.UploadModelVersion(two_thirds_then_stall())
            await _wait_for_partial_upload(data_dir / "artifacts" / "tmp")
            proc.kill()
            proc.wait()
            with pytest.raises(grpc.aio.AioRpcError):
                await call
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -9

    app = RegistryApp(
        load_settings(
            RegistrySettings, server=ServerSettings(port=0), redis=redis_settings, data_dir=data_dir
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = RegistryServiceStub(channel)
            listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model="mlp"))
            assert [v.version for v in listed.model_versions] == [1]
            assert (await stub.GetModel(pb.GetModelRequest(name="mlp"))).model.latest_version == 1
            body = b"".join(
                [
                    m.chunk
                    async for m in stub.DownloadModelVersion(
                        pb.DownloadModelVersionRequest(model="mlp", version=1)
                    )
                ]
            )
            assert body == committed
            # The next version takes the next number: nothing of the killed upload remains.
            assert (await upload(stub, "mlp", torchscript_artifact(seed=1))).version == 2
        artifacts = data_dir / "artifacts"
        assert list((artifacts / "tmp").iterdir()) == []
        assert len([p for p in (artifacts / "sha256").rglob("*") if p.is_file()]) == 2
    finally:
        await app.aclose()
