"""What the history and the audit say, without a server: typed alias moves in the store (and
the schema 5 -> 6 upgrade that adds them), the field-by-field deployment diff, and update
masks (AIP-134) applied in the store's one transaction."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.errors import InvalidArgument
from modelyard.v1 import tensor_pb2
from registry_service import rules, store_aliases, store_audit, store_models
from registry_service.db import SCHEMA_VERSION, Database
from registry_service.deployments import (
    MAX_DIFF_CHARS,
    SPEC_FIELDS,
    apply_update_mask,
    check_update_mask,
    deployment_diff,
)
from registry_service.records import (
    ArtifactFormat,
    AuditFilter,
    AuditRecord,
    DeploymentSpec,
    MoveKind,
    UploadMetadata,
)

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    opened = await Database(tmp_path / "registry.sqlite3").open()
    yield opened
    await opened.aclose()


async def with_versions(store: Database, count: int, model: str = "demo") -> None:
    await store.run(store_models.create_model, model, "")
    for i in range(count):
        await store.run(
            store_models.insert_version,
            UploadMetadata(
                model=model, format=ArtifactFormat.TORCHSCRIPT, sha256=f"{i:064x}", signature=SIGNATURE
            ),
            sha256=f"{i:064x}",
            size_bytes=1,
            created_by="",
        )


# -- the diff -------------------------------------------------------------------------------


def test_the_diff_names_every_changed_field_old_to_new_in_message_order() -> None:
    old = DeploymentSpec(replicas=2, max_queue_delay_ms=None, pinned_versions=(1,))
    new = DeploymentSpec(
        replicas=2,
        pinned_versions=(),
        max_queue_delay_ms=2.5,
        traffic_split={"production": 90, "canary": 10},
        shadow_alias="canary",
        shadow_fraction=0.25,
    )
    assert deployment_diff(old, new) == (
        "pinned_versions [1] -> []; max_queue_delay_ms unset -> 2.5; "
        'traffic_split {} -> {canary: 10, production: 90}; shadow_alias "" -> "canary"; '
        "shadow_fraction 0 -> 0.25"
    )
    assert deployment_diff(new, new) == "no change"


def test_every_deployment_field_is_diffed() -> None:
    changed = DeploymentSpec(
        pinned_versions=(3,),
        replicas=1,
        device="cpu",
        precision="bf16",
        max_batch_size=8,
        max_queue_delay_ms=1.0,
        max_queue_size=5,
        instances=2,
        traffic_split={"production": 100},
        shadow_alias="canary",
        shadow_fraction=0.1,
        preferred_batch_sizes=(4,),
        execution="thread",
        optimization="freeze",
        max_abs_error=0.01,
        min_top1_agreement=0.99,
    )
    text = deployment_diff(DeploymentSpec(), changed)
    assert [part.split(" ", 1)[0] for part in text.split("; ")] == list(SPEC_FIELDS)


def test_the_diff_is_bounded() -> None:
    huge = DeploymentSpec(pinned_versions=tuple(range(1, 5000)), shadow_alias="x" * 500)
    text = deployment_diff(DeploymentSpec(), huge)
    assert len(text) <= MAX_DIFF_CHARS and text.endswith("…")
    assert len(deployment_diff(DeploymentSpec(), DeploymentSpec(shadow_alias="x" * 500))) < 400


# -- update masks ---------------------------------------------------------------------------


def test_an_empty_mask_or_star_replaces_the_whole_deployment() -> None:
    assert check_update_mask([]) is None and check_update_mask(["*"]) is None
    current = DeploymentSpec(replicas=3, traffic_split={"production": 100})
    given = DeploymentSpec(shadow_alias="canary")
    assert apply_update_mask(current, given, None) == given
    assert apply_update_mask(current, given, check_update_mask(["shadow_alias"])) == DeploymentSpec(
        replicas=3, traffic_split={"production": 100}, shadow_alias="canary"
    )


@pytest.mark.parametrize(
    ("paths", "says"),
    [
        (["traffic_splits"], "'traffic_splits', not a Deployment field"),
        (["traffic_split.canary"], "a sub-path"),
        (["placed_versions"], "output only"),
        (["epoch"], "output only"),
        (["*", "replicas"], "stands alone"),
    ],
)
def test_a_bad_mask_path_is_refused_with_the_paths_allowed(paths: list[str], says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_update_mask(paths)
    assert caught.value.field == "update_mask" and says in caught.value.message
    if "stands alone" not in says:
        assert "pinned_versions, replicas, device" in caught.value.message


async def test_a_masked_set_keeps_the_other_fields_and_reports_what_was_there(store: Database) -> None:
    await with_versions(store, 2)
    await store.run(rules.set_alias, "demo", "production", 1, expected_version=0, retention_s=600.0)
    await store.run(rules.set_alias, "demo", "canary", 2, expected_version=0, retention_s=600.0)
    split = await store.run(
        rules.set_deployment,
        "demo",
        DeploymentSpec(traffic_split={"production": 90, "canary": 10}),
        fields=frozenset({"traffic_split"}),
    )
    assert split.previous == DeploymentSpec()
    shadow = await store.run(
        rules.set_deployment,
        "demo",
        DeploymentSpec(shadow_alias="canary", shadow_fraction=0.5),
        fields=frozenset({"shadow_alias", "shadow_fraction"}),
    )
    assert shadow.previous.traffic_split == {"production": 90, "canary": 10}
    assert shadow.state.spec.traffic_split == {"production": 90, "canary": 10}
    assert (shadow.state.spec.shadow_alias, shadow.state.spec.shadow_fraction) == ("canary", 0.5)
    # The merged deployment is what is validated: clearing the shadow alias alone leaves a
    # fraction with nothing to mirror to.
    with pytest.raises(InvalidArgument) as caught:
        await store.run(rules.set_deployment, "demo", DeploymentSpec(), fields=frozenset({"shadow_alias"}))
    assert caught.value.field == "deployment.shadow_alias"
    cleared = await store.run(
        rules.set_deployment, "demo", DeploymentSpec(), fields=frozenset({"traffic_split"})
    )
    assert cleared.state.spec.traffic_split == {} and cleared.state.spec.shadow_alias == "canary"


# -- typed history --------------------------------------------------------------------------


async def test_moves_are_typed_and_filterable(store: Database) -> None:
    await with_versions(store, 3)
    await store.run(
        rules.set_alias, "demo", "production", 1, expected_version=0, actor="key:alice", retention_s=600.0
    )
    await store.run(
        rules.set_alias, "demo", "production", 2, expected_version=1, kind=MoveKind.PROMOTE, retention_s=600.0
    )
    await store.run(rules.rollback_alias, "demo", "production", expected_version=2, retention_s=600.0)
    await store.run(rules.set_alias, "demo", "canary", 3, expected_version=0, retention_s=600.0)
    await store.run(
        rules.set_alias,
        "demo",
        "canary",
        1,
        expected_version=3,
        kind=MoveKind.CANARY_ROLLBACK,
        retention_s=600.0,
    )
    history = await store.read(store_aliases.list_alias_history, "demo")
    assert [(e.alias, e.kind) for e in history] == [
        ("canary", MoveKind.CANARY_ROLLBACK),
        ("canary", MoveKind.SET),
        ("production", MoveKind.ROLLBACK),
        ("production", MoveKind.PROMOTE),
        ("production", MoveKind.SET),
    ]
    rollbacks = await store.read(store_aliases.list_alias_history, "demo", kind=MoveKind.ROLLBACK)
    assert [(e.from_version, e.to_version) for e in rollbacks] == [(2, 1)]
    assert await store.read(store_aliases.list_alias_history, "demo", "canary", kind=MoveKind.PROMOTE) == []


async def test_a_schema_5_database_is_upgraded_and_its_moves_stay_untyped(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    store = await Database(path).open()
    await with_versions(store, 2)
    await store.run(rules.set_alias, "demo", "production", 1, expected_version=0, retention_s=600.0)
    await store.aclose()
    # What a schema-5 registry left: no alias_history.kind column.
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE alias_history DROP COLUMN kind")
    conn.execute("PRAGMA user_version=5")
    conn.commit()
    conn.close()

    store = await Database(path).open()
    try:
        await store.run(rules.set_alias, "demo", "production", 2, expected_version=1, retention_s=600.0)
        await store.run(rules.rollback_alias, "demo", "production", expected_version=2, retention_s=600.0)
        history = await store.read(store_aliases.list_alias_history, "demo")
        assert [e.kind for e in history] == [MoveKind.ROLLBACK, MoveKind.SET, MoveKind.UNSPECIFIED]
    finally:
        await store.aclose()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    conn.close()


# -- the audit's actor filter ---------------------------------------------------------------


async def test_a_bare_actor_name_finds_its_key_its_service_and_its_claim(store: Database) -> None:
    actors = [
        "service:monitor",
        "key:monitor",
        "monitor (claimed; access control off) at ipv4:127.0.0.1:34530",
        "key:monitoring",
        "monitoring (claimed; access control off) at ipv4:127.0.0.1:1",
        "anonymous (access control off) at ipv4:127.0.0.1:2",
        "service:monitor-2",
    ]
    for actor in actors:
        await store.run(
            store_audit.add_audit,
            AuditRecord(
                time=1.0, actor=actor, method="SetAlias", model="demo", target="", request_id="", outcome="OK"
            ),
        )

    async def found(actor: str) -> list[str]:
        return [e.actor for e in await store.read(store_audit.list_audit, AuditFilter(actor=actor))]

    assert await found("monitor") == [actors[2], actors[1], actors[0]]
    assert await found("service:monitor") == [actors[0]]
    assert await found("anonymous") == [actors[5]]
    assert await found("monitor (") == []
