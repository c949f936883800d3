"""The registry database (db, store_*, rules) on a real SQLite file: version numbering, alias
compare-and-set, request-id replays, epochs, reopening, and its lifecycle errors."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.errors import AlreadyExists, Conflict, InvalidArgument, ModelNotFound, VersionNotFound
from modelyard.v1 import tensor_pb2
from registry_service import rules, store_aliases, store_models
from registry_service.db import Database
from registry_service.records import ArtifactFormat, UploadMetadata, VersionState

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)


def metadata(model: str = "demo", request_id: str = "") -> UploadMetadata:
    return UploadMetadata(
        model=model,
        format=ArtifactFormat.TORCHSCRIPT,
        sha256="ab" * 32,
        signature=SIGNATURE,
        labels={"team": "search"},
        metrics={"auc": 0.9},
        request_id=request_id,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    opened = await Database(tmp_path / "registry.sqlite3").open()
    yield opened
    await opened.aclose()


async def test_versions_are_numbered_per_model_without_gaps_under_concurrency(store: Database) -> None:
    await store.run(store_models.create_model, "demo", "")
    await store.run(store_models.create_model, "other", "")
    versions = await asyncio.gather(
        *(
            store.run(
                store_models.insert_version, metadata(), sha256="ab" * 32, size_bytes=1, created_by="me"
            )
            for _ in range(10)
        )
    )
    assert sorted(v.version for v in versions) == list(range(1, 11))
    other = await store.run(
        store_models.insert_version, metadata("other"), sha256="cd" * 32, size_bytes=2, created_by=""
    )
    assert other.version == 1
    got = await store.read(store_models.get_version, "demo", 3)
    assert (got.signature, got.labels, got.metrics, got.state) == (
        SIGNATURE,
        {"team": "search"},
        {"auc": 0.9},
        VersionState.ACTIVE,
    )
    assert (await store.read(store_models.get_model, "demo")).latest_version == 10
    with pytest.raises(ModelNotFound):
        await store.run(
            store_models.insert_version, metadata("ghost"), sha256="ab" * 32, size_bytes=1, created_by=""
        )
    with pytest.raises(VersionNotFound):
        await store.read(store_models.get_version, "demo", 11)
    with pytest.raises(ModelNotFound):
        await store.read(store_models.get_version, "ghost", 1)


async def test_create_model_is_unique_and_replayable(store: Database) -> None:
    first = await store.run(store_models.create_model, "demo", "an MLP", request_id="r1")
    assert await store.run(store_models.create_model, "demo", "an MLP", request_id="r1") == first
    with pytest.raises(AlreadyExists):
        await store.run(store_models.create_model, "demo", "an MLP", request_id="r2")
    with pytest.raises(AlreadyExists):
        await store.run(store_models.create_model, "demo", "an MLP")


async def test_set_alias_compare_and_set(store: Database) -> None:
    await store.run(store_models.create_model, "demo", "")
    for _ in range(3):
        await store.run(
            store_models.insert_version, metadata(), sha256="ab" * 32, size_bytes=1, created_by=""
        )

    created = await store.run(
        rules.set_alias, "demo", "production", 1, expected_version=0, reason="launch", retention_s=600.0
    )
    assert (created.previous_version, created.epoch, created.aliases, created.changed) == (
        0,
        1,
        {"production": 1},
        True,
    )
    with pytest.raises(Conflict, match="points at version 1, but the call expected it not to exist"):
        await store.run(rules.set_alias, "demo", "production", 2, expected_version=0, retention_s=600.0)
    with pytest.raises(Conflict, match="does not exist, but the call expected it to point at version 1"):
        await store.run(rules.set_alias, "demo", "canary", 2, expected_version=1, retention_s=600.0)
    moved = await store.run(rules.set_alias, "demo", "production", 2, expected_version=1, retention_s=600.0)
    assert (moved.previous_version, moved.epoch) == (1, 2)
    # Already there: nothing moves, the epoch stays.
    same = await store.run(rules.set_alias, "demo", "production", 2, expected_version=2, retention_s=600.0)
    assert (same.changed, same.epoch, same.previous_version) == (False, 2, 2)
    forced = await store.run(
        rules.set_alias, "demo", "production", 3, expected_version=None, retention_s=600.0
    )
    assert (forced.previous_version, forced.epoch) == (2, 3)
    with pytest.raises(VersionNotFound):
        await store.run(rules.set_alias, "demo", "production", 9, expected_version=None, retention_s=600.0)
    assert await store.read(store_aliases.alias_state, "demo") == ({"production": 3}, 3)


async def test_set_alias_replays_a_request_id(store: Database) -> None:
    await store.run(store_models.create_model, "demo", "")
    await store.run(store_models.insert_version, metadata(), sha256="ab" * 32, size_bytes=1, created_by="")
    await store.run(store_models.insert_version, metadata(), sha256="ab" * 32, size_bytes=1, created_by="")
    first = await store.run(
        rules.set_alias, "demo", "production", 1, expected_version=0, request_id="move", retention_s=600.0
    )
    await store.run(rules.set_alias, "demo", "production", 2, expected_version=1, retention_s=600.0)
    # The retry arrives after another move: it is answered as the first call was, and moves nothing.
    replay = await store.run(
        rules.set_alias, "demo", "production", 1, expected_version=0, request_id="move", retention_s=600.0
    )
    assert (replay.alias, replay.previous_version, replay.epoch, replay.changed) == (
        first.alias,
        0,
        1,
        False,
    )
    assert await store.read(store_aliases.alias_state, "demo") == ({"production": 2}, 2)
    with pytest.raises(InvalidArgument):
        await store.run(
            rules.set_alias,
            "demo",
            "production",
            2,
            expected_version=None,
            request_id="move",
            retention_s=600.0,
        )


async def test_concurrent_compare_and_set_has_exactly_one_winner(store: Database) -> None:
    await store.run(store_models.create_model, "demo", "")
    for _ in range(2):
        await store.run(
            store_models.insert_version, metadata(), sha256="ab" * 32, size_bytes=1, created_by=""
        )
    await store.run(rules.set_alias, "demo", "production", 1, expected_version=0, retention_s=600.0)
    results = await asyncio.gather(
        *(
            store.run(rules.set_alias, "demo", "production", 2, expected_version=1, retention_s=600.0)
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 19
    assert await store.read(store_aliases.alias_state, "demo") == ({"production": 2}, 2)


async def test_alias_states_and_epoch_bump(store: Database) -> None:
    await store.run(store_models.create_model, "demo", "")
    await store.run(store_models.create_model, "quiet", "")
    await store.run(store_models.insert_version, metadata(), sha256="ab" * 32, size_bytes=1, created_by="")
    await store.run(rules.set_alias, "demo", "production", 1, expected_version=0, retention_s=600.0)
    assert await store.read(store_aliases.all_alias_states) == {"demo": ({"production": 1}, 1)}
    assert await store.run(store_aliases.bump_epoch, "demo", above=41) == ({"production": 1}, 42)
    assert await store.run(store_aliases.bump_epoch, "demo", above=3) == ({"production": 1}, 43)


async def test_reopening_keeps_everything_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    store = await Database(path).open()
    await store.run(store_models.create_model, "demo", "kept")
    await store.aclose()
    store = await Database(path).open()
    assert (await store.read(store_models.get_model, "demo")).description == "kept"
    await store.aclose()

    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        await Database(path).open()


async def test_lifecycle_misuse_is_a_clear_error(tmp_path: Path) -> None:
    store = Database(tmp_path / "registry.sqlite3")
    with pytest.raises(RuntimeError, match="before open"):
        await store.read(store_models.list_models)
    await store.open()
    with pytest.raises(RuntimeError, match="more than once"):
        await store.open()
    await store.aclose()
    await store.aclose()
    with pytest.raises(RuntimeError, match="after aclose"):
        await store.read(store_models.list_models)
