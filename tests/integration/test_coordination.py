"""CoordinationStore against a real Redis: epoch-guarded alias writes, events, membership."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.coordination import AliasesEvent, CoordinationStore, ServiceRecord, VersionRecord

pytestmark = pytest.mark.integration


async def test_alias_writes_apply_only_with_a_newer_epoch(store: CoordinationStore) -> None:
    assert await store.get_aliases("demo") == ({}, 0)
    assert await store.apply_aliases("demo", {"production": 1}, epoch=1)
    assert await store.apply_aliases("demo", {"production": 2, "canary": 3}, epoch=3)
    # A late, older write (a replay or a slow writer) never moves a pointer back.
    assert not await store.apply_aliases("demo", {"production": 1}, epoch=2)
    assert await store.get_aliases("demo") == ({"production": 2, "canary": 3}, 3)
    assert await store.list_models() == ["demo"]
    assert await store.all_aliases() == {"demo": ({"production": 2, "canary": 3}, 3)}


async def test_alias_changes_are_published(store: CoordinationStore) -> None:
    received: list[AliasesEvent] = []

    async def listen() -> None:
        async for event in store.events():
            if isinstance(event, AliasesEvent):
                received.append(event)
                return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.2)  # let the subscription land before publishing
    await store.apply_aliases("demo", {"production": 4}, epoch=1)
    await asyncio.wait_for(listener, 5)
    assert received == [AliasesEvent(model="demo", epoch=1, aliases={"production": 4})]


async def test_membership_expires_and_deregisters(store: CoordinationStore) -> None:
    record = ServiceRecord(
        id="model-server-1",
        kind="model_server",
        address="127.0.0.1:1",
        versions=[VersionRecord(model="demo", version=1, state="ready")],
    )
    await store.heartbeat(record, ttl_s=0.3)
    await store.heartbeat(record.model_copy(update={"id": "gateway-1", "kind": "gateway"}), ttl_s=30)
    assert {s.id for s in await store.list_services()} == {"model-server-1", "gateway-1"}
    await asyncio.sleep(0.5)
    assert [s.id for s in await store.list_services()] == ["gateway-1"]
    await store.deregister("gateway-1")
    assert await store.list_services() == []


async def test_pruning_an_expired_service_keeps_the_live_ones_listed(store: CoordinationStore) -> None:
    # A SIGKILLed server's record expires; listing prunes it, and only it: the live services
    # stay in the index between their heartbeats (gateways route from this list).
    dead = ServiceRecord(id="model-server-dead", kind="model_server", address="127.0.0.1:1")
    live = ServiceRecord(id="model-server-live", kind="model_server", address="127.0.0.1:2")
    await store.heartbeat(dead, ttl_s=0.2)
    await store.heartbeat(live, ttl_s=30)
    await asyncio.sleep(0.3)
    assert [s.id for s in await store.list_services()] == ["model-server-live"]
    assert [s.id for s in await store.list_services()] == ["model-server-live"]


async def test_deployment_travels_with_the_alias_map(store: CoordinationStore) -> None:
    from modelyard.coordination import Deployment

    assert await store.all_deployments() == {}
    await store.apply_aliases("demo", {"production": 1}, epoch=1)
    assert await store.all_deployments() == {"demo": Deployment()}
    deployment = Deployment(placed_versions=[1, 2], traffic_split={"production": 90, "canary": 10})
    await store.apply_aliases("demo", {"production": 1, "canary": 2}, epoch=2, deployment=deployment)
    # An older epoch moves neither the aliases nor the deployment.
    assert not await store.apply_aliases("demo", {}, epoch=1, deployment=Deployment())
    # No deployment given: the stored one stays.
    await store.apply_aliases("demo", {"production": 2}, epoch=3)
    assert await store.all_deployments() == {"demo": deployment}
    assert await store.get_aliases("demo") == ({"production": 2}, 3)
