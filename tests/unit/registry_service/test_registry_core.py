"""The Registry core with a fake alias sink in place of Redis: what happens while Redis is
down, how the resync decides what to rewrite, and what an upload checks before reading a
byte."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from modelyard.coordination import Deployment, ServiceRecord
from modelyard.errors import CoordinationUnavailable, InvalidArgument, ModelNotFound
from modelyard.v1 import tensor_pb2
from registry_service.artifacts import ArtifactStore
from registry_service.db import Database
from registry_service.records import ArtifactFormat, UploadMetadata
from registry_service.registry import Registry

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)


def fake_torchscript() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/code/__torch__.py", b"def forward(self, x): return x")
        archive.writestr("m/data.pkl", b"\x80\x02N.")  # a pickle of None: no globals
    return buffer.getvalue()


ARTIFACT = fake_torchscript()


class FakeAliasSink:
    """Redis as the registry sees it: an epoch-guarded map per model, and an off switch."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[dict[str, int], int]] = {}
        self.deployments: dict[str, Deployment] = {}
        self.services: list[ServiceRecord] = []
        self.down = False
        self.writes = 0

    async def apply_aliases(
        self, model: str, aliases: dict[str, int], epoch: int, deployment: Deployment | None = None
    ) -> bool:
        if self.down:
            raise CoordinationUnavailable("redis is down")
        if epoch <= self.live.get(model, ({}, 0))[1]:
            return False
        self.live[model] = (dict(aliases), epoch)
        if deployment is not None:
            self.deployments[model] = deployment
        self.writes += 1
        return True

    async def routing_snapshot(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], int]], dict[str, Deployment], list[ServiceRecord]]:
        return await self.all_aliases(), await self.all_deployments(), await self.list_services()

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        if self.down:
            raise CoordinationUnavailable("redis is down")
        return dict(self.live)

    async def all_deployments(self) -> dict[str, Deployment]:
        if self.down:
            raise CoordinationUnavailable("redis is down")
        return {model: self.deployments.get(model, Deployment()) for model in self.live}

    async def list_services(self) -> list[ServiceRecord]:
        if self.down:
            raise CoordinationUnavailable("redis is down")
        return list(self.services)


@pytest.fixture
def sink() -> FakeAliasSink:
    return FakeAliasSink()


@pytest.fixture
async def registry(tmp_path: Path, sink: FakeAliasSink) -> AsyncIterator[Registry]:
    store = await Database(tmp_path / "registry.sqlite3").open()
    artifacts = ArtifactStore(tmp_path / "artifacts")
    await artifacts.open()
    yield Registry(store, artifacts, sink, max_artifact_bytes=1 << 20, download_chunk_bytes=1024)
    await store.aclose()


def upload_metadata(model: str = "demo", **changes: object) -> UploadMetadata:
    values: dict[str, object] = {
        "model": model,
        "format": ArtifactFormat.TORCHSCRIPT,
        "sha256": hashlib.sha256(ARTIFACT).hexdigest().upper(),  # any case is accepted
        "signature": SIGNATURE,
    }
    values.update(changes)
    return UploadMetadata(**values)  # type: ignore[arg-type]  # built from a loose dict on purpose


async def once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def never() -> AsyncIterator[bytes]:
    raise AssertionError("the upload read bytes before its metadata was accepted")
    yield b""  # pragma: no cover - makes this an async generator


async def test_an_alias_moved_while_redis_is_down_goes_live_on_the_next_resync(
    registry: Registry, sink: FakeAliasSink
) -> None:
    await registry.create_model("demo")
    await registry.upload_version(upload_metadata(), once(ARTIFACT))
    sink.down = True
    change = await registry.set_alias("demo", "production", 1, expected_version=0)
    assert change.epoch == 1
    assert sink.live == {}
    with pytest.raises(CoordinationUnavailable):
        await registry.sync_to_redis()
    sink.down = False
    assert await registry.sync_to_redis() == 1
    assert sink.live == {"demo": ({"production": 1}, 1)}
    # In sync: the next resync writes nothing.
    assert await registry.sync_to_redis() == 0
    assert sink.writes == 1


async def test_resync_rewrites_a_redis_that_is_ahead(registry: Registry, sink: FakeAliasSink) -> None:
    await registry.create_model("demo")
    await registry.upload_version(upload_metadata(), once(ARTIFACT))
    await registry.set_alias("demo", "production", 1)
    sink.live["demo"] = ({"production": 5}, 9)
    assert await registry.sync_to_redis() == 1
    assert sink.live["demo"] == ({"production": 1}, 10)
    # Ahead with the same aliases: the epoch still moves past it, so later moves are accepted.
    sink.live["demo"] = ({"production": 1}, 20)
    await registry.sync_to_redis()
    await registry.set_alias("demo", "canary", 1)
    assert sink.live["demo"] == ({"production": 1, "canary": 1}, 22)


@pytest.mark.parametrize(
    "metadata,field",
    [
        (upload_metadata(model="Demo"), "metadata.model"),
        (upload_metadata(format=None), "metadata.format"),
        (upload_metadata(sha256="xyz"), "metadata.sha256"),
        (
            upload_metadata(signature=tensor_pb2.Signature(outputs=SIGNATURE.outputs)),
            "metadata.signature.inputs",
        ),
        (
            upload_metadata(
                signature=tensor_pb2.Signature(
                    inputs=[SIGNATURE.inputs[0], SIGNATURE.inputs[0]], outputs=SIGNATURE.outputs
                )
            ),
            "metadata.signature.inputs[1].name",
        ),
        (
            upload_metadata(
                signature=tensor_pb2.Signature(
                    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32)],
                    outputs=SIGNATURE.outputs,
                )
            ),
            "metadata.signature.inputs[0].shape",
        ),
        (
            upload_metadata(
                signature=tensor_pb2.Signature(
                    inputs=SIGNATURE.inputs,
                    outputs=[
                        tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-2])
                    ],
                )
            ),
            "metadata.signature.outputs[0].shape",
        ),
        (upload_metadata(metrics={"loss": float("nan")}), "metadata.metrics"),
    ],
)
async def test_bad_metadata_is_refused_before_any_byte_is_read(
    registry: Registry, metadata: UploadMetadata, field: str
) -> None:
    await registry.create_model("demo")
    with pytest.raises(InvalidArgument) as caught:
        await registry.upload_version(metadata, never())
    assert caught.value.field == field


async def test_an_unknown_model_is_refused_before_any_byte_is_read(registry: Registry) -> None:
    with pytest.raises(ModelNotFound):
        await registry.upload_version(upload_metadata(model="ghost"), never())


async def test_download_yields_the_verified_bytes(registry: Registry) -> None:
    await registry.create_model("demo")
    stored = await registry.upload_version(upload_metadata(), once(ARTIFACT))
    assert stored.sha256 == hashlib.sha256(ARTIFACT).hexdigest()
    record, chunks = await registry.download("demo", 1)
    assert record == stored
    assert b"".join([c async for c in chunks]) == ARTIFACT


async def test_names_and_numbers_are_checked(registry: Registry) -> None:
    calls: list[tuple[Callable[[], Awaitable[object]], str]] = [
        (lambda: registry.create_model("9lives"), "name"),
        (lambda: registry.create_model("x" * 64), "name"),
        (lambda: registry.create_model("demo\n"), "name"),
        (lambda: registry.get_version("demo", 0), "version"),
        (lambda: registry.set_alias("demo", "", 1), "alias"),
        (lambda: registry.set_alias("demo", "a", 1, expected_version=-1), "expected_version"),
    ]
    for call, field in calls:
        with pytest.raises(InvalidArgument) as caught:
            await call()
        assert caught.value.field == field
    assert (await registry.create_model("a" + "-_9" * 20 + "z")).name.startswith("a-_9")
