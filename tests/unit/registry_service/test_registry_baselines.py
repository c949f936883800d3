"""Input baselines recorded with a version: stored and returned as uploaded, checked before any
byte is read, and the schema 2 -> 3 upgrade of an existing database in place."""

from __future__ import annotations

import hashlib
import io
import sqlite3
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from modelyard.baseline import compute_baseline
from modelyard.coordination import Deployment, ServiceRecord
from modelyard.errors import InvalidArgument
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service import store_models
from registry_service.artifacts import ArtifactStore
from registry_service.db import SCHEMA_VERSION, Database
from registry_service.records import ArtifactFormat, UploadMetadata
from registry_service.registry import Registry

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)
BASELINES = tuple(compute_baseline({"x": torch.randn(500, 2, generator=torch.Generator().manual_seed(0))}))


def fake_torchscript() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/code/__torch__.py", b"def forward(self, x): return x")
        archive.writestr("m/data.pkl", b"\x80\x02N.")  # a pickle of None: no globals
    return buffer.getvalue()


ARTIFACT = fake_torchscript()


class NoRedis:
    """The alias sink: nothing in these tests moves an alias."""

    async def apply_aliases(
        self, model: str, aliases: dict[str, int], epoch: int, deployment: Deployment | None = None
    ) -> bool:
        return True

    async def routing_snapshot(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], int]], dict[str, Deployment], list[ServiceRecord]]:
        return await self.all_aliases(), await self.all_deployments(), await self.list_services()

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        return {}

    async def all_deployments(self) -> dict[str, Deployment]:
        return {}

    async def list_services(self) -> list[ServiceRecord]:
        return []


def metadata(**changes: object) -> UploadMetadata:
    values: dict[str, object] = {
        "model": "demo",
        "format": ArtifactFormat.TORCHSCRIPT,
        "sha256": hashlib.sha256(ARTIFACT).hexdigest(),
        "signature": SIGNATURE,
        "input_baselines": BASELINES,
    }
    values.update(changes)
    return UploadMetadata(**values)  # type: ignore[arg-type]  # built from a loose dict on purpose


async def once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def never() -> AsyncIterator[bytes]:
    raise AssertionError("the upload read bytes before its metadata was accepted")
    yield b""  # pragma: no cover - makes this an async generator


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    store = await Database(tmp_path / "registry.sqlite3").open()
    artifacts = ArtifactStore(tmp_path / "artifacts")
    await artifacts.open()
    yield Registry(store, artifacts, NoRedis(), max_artifact_bytes=1 << 20, download_chunk_bytes=1024)
    await store.aclose()


async def test_a_baseline_is_stored_with_its_version_and_returned_as_uploaded(registry: Registry) -> None:
    await registry.create_model("demo")
    uploaded = await registry.upload_version(metadata(), once(ARTIFACT))
    assert uploaded.input_baselines == BASELINES
    assert (await registry.get_version("demo", uploaded.version)).input_baselines == BASELINES
    bare = await registry.upload_version(metadata(input_baselines=()), once(ARTIFACT))
    assert (await registry.list_versions("demo"))[1].input_baselines == () == bare.input_baselines


def broken(**feature: object) -> tuple[registry_pb2.InputBaseline, ...]:
    message = registry_pb2.InputBaseline()
    message.CopyFrom(BASELINES[0])
    target = message.features[0]
    for name, value in feature.items():
        target.ClearField(name)
        if isinstance(value, list):
            getattr(target, name).extend(value)
        else:
            setattr(target, name, value)
    return (message,)


@pytest.mark.parametrize(
    ("baselines", "field"),
    [
        (
            (registry_pb2.InputBaseline(input="z", item_count=1, features=[{}]),),
            "metadata.input_baselines[0].input",
        ),
        (BASELINES + BASELINES, "metadata.input_baselines[1].input"),
        (
            (registry_pb2.InputBaseline(input="x", item_count=0, features=[{}]),),
            "metadata.input_baselines[0].item_count",
        ),
        ((registry_pb2.InputBaseline(input="x", item_count=5),), "metadata.input_baselines[0].features"),
        (broken(std=-1.0), "metadata.input_baselines[0].features[0]"),
        (broken(bin_edges=[1.0, 0.0]), "metadata.input_baselines[0].features[0].bin_fractions"),
        (broken(bin_edges=[2.0] * 9 + [1.0]), "metadata.input_baselines[0].features[0].bin_fractions"),
        (
            broken(bin_edges=[float(i) for i in range(9, 0, -1)]),
            "metadata.input_baselines[0].features[0].bin_edges",
        ),
        (broken(bin_fractions=[0.5] * 10), "metadata.input_baselines[0].features[0].bin_fractions"),
    ],
)
async def test_a_bad_baseline_is_refused_before_any_byte_is_read(
    registry: Registry, baselines: tuple[registry_pb2.InputBaseline, ...], field: str
) -> None:
    await registry.create_model("demo")
    with pytest.raises(InvalidArgument) as caught:
        await registry.upload_version(metadata(input_baselines=baselines), never())
    assert caught.value.field == field


async def test_a_schema_2_database_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    store = await Database(path).open()
    await store.run(store_models.create_model, "demo", "")
    await store.run(
        store_models.insert_version,
        metadata(input_baselines=()),
        sha256="ab" * 32,
        size_bytes=1,
        created_by="",
    )
    await store.aclose()
    # What a schema-2 registry left: no input_baselines column.
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE versions DROP COLUMN input_baselines")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()

    store = await Database(path).open()
    try:
        old = await store.read(store_models.get_version, "demo", 1)
        assert old.input_baselines == () and old.sha256 == "ab" * 32
        new = await store.run(
            store_models.insert_version, metadata(), sha256="cd" * 32, size_bytes=1, created_by=""
        )
        assert (await store.read(store_models.get_version, "demo", new.version)).input_baselines == BASELINES
    finally:
        await store.aclose()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    conn.close()
