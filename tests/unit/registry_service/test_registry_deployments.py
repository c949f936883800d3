"""Rollout logic without a server: deployment validation, rollback and history in the store,
placement with retention on a fake clock, archive/delete guards, the audit log, and promote's
wait for readiness against a fake membership view."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.coordination import Deployment, ServiceRecord, VersionRecord
from modelyard.errors import (
    AliasNotFound,
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
)
from modelyard.v1 import tensor_pb2
from registry_service import rules, store_aliases, store_audit, store_deployments, store_models
from registry_service.artifacts import ArtifactStore
from registry_service.db import Database
from registry_service.deployments import check_deployment, live_deployment
from registry_service.records import (
    ArtifactFormat,
    AuditFilter,
    AuditRecord,
    DeploymentSpec,
    UploadMetadata,
    VersionState,
)
from registry_service.registry import Registry

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[Database]:
    opened = await Database(tmp_path / "registry.sqlite3", clock=clock).open()
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
            sha256=f"{i % 2:064x}",  # versions 1 and 3 share their content
            size_bytes=1,
            created_by="",
        )


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "error", "field"),
    [
        (DeploymentSpec(replicas=-1), InvalidArgument, "deployment.replicas"),
        (DeploymentSpec(device="tpu"), InvalidArgument, "deployment.device"),
        (DeploymentSpec(precision="int8"), InvalidArgument, "deployment.precision"),
        (DeploymentSpec(max_queue_delay_ms=float("nan")), InvalidArgument, "deployment.max_queue_delay_ms"),
        (DeploymentSpec(traffic_split={"production": 50}), InvalidArgument, "deployment.traffic_split"),
        (
            DeploymentSpec(traffic_split={"production": 50, "x": 50}),
            InvalidArgument,
            "deployment.traffic_split",
        ),
        (DeploymentSpec(shadow_fraction=0.5), InvalidArgument, "deployment.shadow_alias"),
        (
            DeploymentSpec(shadow_alias="canary", shadow_fraction=1.5),
            InvalidArgument,
            "deployment.shadow_fraction",
        ),
        (DeploymentSpec(pinned_versions=(7,)), InvalidArgument, "deployment.pinned_versions"),
        (DeploymentSpec(pinned_versions=(2,)), FailedPrecondition, "deployment.pinned_versions"),
    ],
)
def test_bad_deployments_name_the_field(spec: DeploymentSpec, error: type[Exception], field: str) -> None:
    with pytest.raises(error) as caught:
        check_deployment(
            spec,
            model="demo",
            aliases={"production": 1, "canary": 3},
            versions={1: VersionState.ACTIVE, 2: VersionState.ARCHIVED, 3: VersionState.ACTIVE},
        )
    assert getattr(caught.value, "field", None) == field


def test_a_good_deployment_passes_and_goes_live_with_defaults_as_none() -> None:
    spec = DeploymentSpec(
        traffic_split={"production": 90, "canary": 10}, shadow_alias="canary", shadow_fraction=0.1
    )
    check_deployment(
        spec, model="demo", aliases={"production": 1, "canary": 3}, versions={1: VersionState.ACTIVE}
    )
    assert DeploymentSpec.from_json(spec.to_json()) == spec


# -- store ----------------------------------------------------------------------------------


async def test_rollback_goes_to_the_previous_target_and_is_compare_and_set(store: Database) -> None:
    await with_versions(store, 3)
    await store.run(rules.set_alias, "demo", "production", 1, expected_version=0, retention_s=60)
    with pytest.raises(FailedPrecondition):
        await store.run(rules.rollback_alias, "demo", "production", expected_version=None, retention_s=60)
    with pytest.raises(AliasNotFound):
        await store.run(rules.rollback_alias, "demo", "canary", expected_version=None, retention_s=60)
    await store.run(rules.set_alias, "demo", "production", 2, expected_version=1, retention_s=60)
    with pytest.raises(Conflict):
        await store.run(rules.rollback_alias, "demo", "production", expected_version=1, retention_s=60)

    back = await store.run(
        rules.rollback_alias,
        "demo",
        "production",
        expected_version=2,
        actor="ann",
        request_id="r1",
        retention_s=60,
    )
    assert (back.previous_version, back.alias.version, back.epoch, back.changed) == (2, 1, 3, True)
    replay = await store.run(
        rules.rollback_alias, "demo", "production", expected_version=2, request_id="r1", retention_s=60
    )
    assert (replay.alias.version, replay.epoch, replay.changed) == (1, 3, False)

    history = await store.read(store_aliases.list_alias_history, "demo")
    assert [(h.from_version, h.to_version, h.epoch) for h in history] == [(2, 1, 3), (1, 2, 2), (0, 1, 1)]
    assert (history[0].actor, history[0].reason, history[0].request_id) == (
        "ann",
        "rollback from version 2",
        "r1",
    )
    older = await store.read(
        store_aliases.list_alias_history, "demo", "production", page_size=1, before_id=history[0].id
    )
    assert [h.to_version for h in older] == [2]


async def test_replaced_versions_are_held_for_the_retention_window(store: Database, clock: Clock) -> None:
    await with_versions(store, 3)
    await store.run(rules.set_alias, "demo", "production", 1, expected_version=0, retention_s=60)
    await store.run(rules.set_alias, "demo", "canary", 1, expected_version=0, retention_s=60)
    moved = await store.run(rules.set_alias, "demo", "production", 2, expected_version=1, retention_s=60)
    assert moved.state is not None and moved.state.placed_versions == (1, 2)  # canary still on 1
    moved = await store.run(rules.set_alias, "demo", "canary", 3, expected_version=1, retention_s=60)
    assert moved.state is not None and moved.state.placed_versions == (1, 2, 3)  # 1 held now
    assert await store.read(store_deployments.next_hold_expiry) == clock.now + 60

    clock.now += 59
    assert await store.run(rules.expire_holds) == []
    clock.now += 1
    [expired] = await store.run(rules.expire_holds)
    assert (expired.placed_versions, expired.epoch) == ((2, 3), moved.epoch + 1)
    assert await store.read(store_deployments.next_hold_expiry) is None


async def test_pins_holds_archive_and_delete(store: Database) -> None:
    await with_versions(store, 3)
    await store.run(rules.set_alias, "demo", "production", 2, expected_version=0, retention_s=60)
    change = await store.run(rules.set_deployment, "demo", DeploymentSpec(pinned_versions=(3,), replicas=2))
    assert change.previous == DeploymentSpec() and change.state.placed_versions == (2, 3)
    for refused in (rules.archive_version, rules.delete_version):
        for version in (2, 3):  # aliased, pinned
            with pytest.raises(FailedPrecondition):
                await store.run(refused, "demo", version)

    state = await store.run(rules.hold_version, "demo", 1, until=2000.0, why="promoting")
    assert state.placed_versions == (1, 2, 3)
    record, state = await store.run(rules.archive_version, "demo", 1)
    assert record.state is VersionState.ARCHIVED and state.placed_versions == (2, 3)
    with pytest.raises(FailedPrecondition):
        await store.run(rules.hold_version, "demo", 1, until=2000.0, why="promoting")

    await store.run(rules.set_deployment, "demo", DeploymentSpec())
    outcome = await store.run(rules.delete_version, "demo", 1)
    assert not outcome.artifact_unreferenced  # version 3 shares its content
    outcome = await store.run(rules.delete_version, "demo", 3)
    assert outcome.artifact_unreferenced and outcome.state.placed_versions == (2,)


async def test_audit_log_filters_and_pages(store: Database) -> None:
    for i in range(5):
        await store.run(
            store_audit.add_audit,
            AuditRecord(
                time=float(i),
                actor="ann" if i % 2 else "bob",
                method="SetAlias",
                model="demo",
                target="",
                request_id=str(i),
                outcome="OK" if i < 4 else "ABORTED",
            ),
        )
    assert [r.request_id for r in await store.read(store_audit.list_audit, AuditFilter(actor="bob"))] == [
        "4",
        "2",
        "0",
    ]
    assert [
        r.request_id for r in await store.read(store_audit.list_audit, AuditFilter(outcome="ABORTED"))
    ] == ["4"]
    page = await store.read(store_audit.list_audit, AuditFilter(), page_size=2)
    rest = await store.read(
        store_audit.list_audit, AuditFilter(start_time=1.0), page_size=2, before_id=page[-1].id
    )
    assert [r.request_id for r in page + rest] == ["4", "3", "2", "1"]


# -- promote --------------------------------------------------------------------------------


class FakeCluster:
    """Redis as the registry sees it, with model servers whose records the test writes."""

    def __init__(self) -> None:
        self.live: dict[str, tuple[dict[str, int], int]] = {}
        self.deployments: dict[str, Deployment] = {}
        self.services: list[ServiceRecord] = []

    async def apply_aliases(
        self, model: str, aliases: dict[str, int], epoch: int, deployment: Deployment | None = None
    ) -> bool:
        if epoch <= self.live.get(model, ({}, 0))[1]:
            return False
        self.live[model] = (dict(aliases), epoch)
        if deployment is not None:
            self.deployments[model] = deployment
        return True

    async def routing_snapshot(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], int]], dict[str, Deployment], list[ServiceRecord]]:
        return await self.all_aliases(), await self.all_deployments(), await self.list_services()

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        return dict(self.live)

    async def all_deployments(self) -> dict[str, Deployment]:
        return dict(self.deployments)

    async def list_services(self) -> list[ServiceRecord]:
        return list(self.services)

    def model_server(self, *states: tuple[int, str]) -> None:
        self.services.append(
            ServiceRecord(
                id=f"ms-{len(self.services)}",
                kind="model_server",
                address="127.0.0.1:1",
                versions=[VersionRecord(model="demo", version=v, state=s, error="boom") for v, s in states],
            )
        )


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
async def registry(tmp_path: Path, store: Database, cluster: FakeCluster, clock: Clock) -> Registry:
    artifacts = ArtifactStore(tmp_path / "artifacts")
    await artifacts.open()
    return Registry(
        store,
        artifacts,
        cluster,
        max_artifact_bytes=1 << 20,
        download_chunk_bytes=1024,
        retention_s=60,
        ready_poll_interval_s=0.001,
        clock=clock,
    )


async def test_promote_flips_only_once_the_version_is_ready(
    registry: Registry, store: Database, cluster: FakeCluster
) -> None:
    await with_versions(store, 2)
    await registry.set_alias("demo", "production", 1, expected_version=0)
    cluster.model_server((1, "ready"), (2, "ready"))
    outcome = await registry.promote("demo", "production", 2, expected_version=1, ready_timeout_s=5)
    assert (outcome.change.previous_version, outcome.change.alias.version, outcome.ready_replicas) == (
        1,
        2,
        1,
    )
    assert cluster.live["demo"][0] == {"production": 2}
    assert cluster.deployments["demo"].placed_versions == [1, 2]  # 1 retained for rollback
    assert live_deployment(await store.read(rules.routing_state, "demo")) == cluster.deployments["demo"]


@pytest.mark.parametrize(
    ("servers", "error"),
    [
        ([], FailedPrecondition),  # nothing could ever load it
        ([(2, "loading")], DeadlineExceeded),
        ([(2, "failed")], FailedPrecondition),
    ],
)
async def test_promote_that_cannot_get_ready_leaves_the_alias_and_placement_alone(
    registry: Registry,
    store: Database,
    cluster: FakeCluster,
    servers: list[tuple[int, str]],
    error: type[Exception],
) -> None:
    await with_versions(store, 2)
    await registry.set_alias("demo", "production", 1, expected_version=0)
    if servers:
        cluster.model_server(*servers)
    with pytest.raises(error):
        await registry.promote("demo", "production", 2, ready_timeout_s=0.02)
    assert cluster.live["demo"][0] == {"production": 1}
    assert cluster.deployments["demo"].placed_versions == [1]
    with pytest.raises(Conflict):
        await registry.promote("demo", "production", 2, expected_version=2)


async def test_resync_rewrites_a_lost_deployment(
    registry: Registry, store: Database, cluster: FakeCluster
) -> None:
    await with_versions(store, 1)
    await registry.set_alias("demo", "production", 1, expected_version=0)
    await registry.set_deployment("demo", DeploymentSpec(replicas=3))
    cluster.live.clear()
    cluster.deployments.clear()
    assert await registry.sync_to_redis() == 1
    assert cluster.deployments["demo"].replicas == 3
    assert await registry.sync_to_redis() == 0
