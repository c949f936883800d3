"""The gateway's routing refresh on a real Redis: one atomic snapshot; a replica whose record
vanished without a word (a FLUSHALL, a failover) keeps its calls for a short grace while it
writes its record again; one that said it left (`down`) is dropped at once."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.forwarder import ChannelPool
from gateway.routing_sync import RoutingSync
from modelyard.coordination import CoordinationStore, Deployment, ServiceRecord, VersionRecord
from modelyard.settings import RedisSettings

pytestmark = pytest.mark.integration


def _record(server_id: str) -> ServiceRecord:
    return ServiceRecord(
        id=server_id,
        kind="model_server",
        address=f"127.0.0.1:{5000 + int(server_id[-1])}",
        versions=[VersionRecord(model="m", version=1, state="ready")],
    )


def _servers(sync: RoutingSync) -> set[str]:
    return {r.server_id for r in sync.table.replicas.get(("m", 1), [])}


async def test_the_snapshot_reads_aliases_deployments_and_services_together(store: CoordinationStore) -> None:
    await store.apply_aliases(
        "m", {"production": 1, "canary": 2}, 3, deployment=Deployment(placed_versions=[1, 2])
    )
    await store.heartbeat(_record("ms-1"), ttl_s=10)
    aliases, deployments, services = await store.routing_snapshot()
    assert aliases == {"m": ({"production": 1, "canary": 2}, 3)}
    assert deployments["m"].placed_versions == [1, 2]
    assert [s.id for s in services] == ["ms-1"]


async def test_a_flush_keeps_the_routes_for_a_grace_and_a_departure_drops_them_at_once(
    store: CoordinationStore, redis_settings: RedisSettings
) -> None:
    pool = ChannelPool(max_message_bytes=1 << 20)
    sync = RoutingSync(store, pool, resync_interval_s=60.0, vanished_grace_s=0.5)
    await store.apply_aliases("m", {"production": 1}, 1)
    for server_id in ("ms-1", "ms-2"):
        await store.heartbeat(_record(server_id), ttl_s=10)
    await sync.start()
    try:
        assert _servers(sync) == {"ms-1", "ms-2"}

        # FLUSHALL, then the registry's re-push arrives before any model server's heartbeat.
        client = aioredis.Redis.from_url(redis_settings.url)
        await client.flushall()
        await client.aclose()
        await store.apply_aliases("m", {"production": 1}, 1)
        await sync.refresh()
        assert _servers(sync) == {"ms-1", "ms-2"}, "calls would fail: no replica for m v1"
        await asyncio.sleep(0.6)
        await sync.refresh()
        assert _servers(sync) == set(), "a replica that never came back is dropped after the grace"

        for server_id in ("ms-1", "ms-2"):
            await store.heartbeat(_record(server_id), ttl_s=10)
        await sync.refresh()
        assert _servers(sync) == {"ms-1", "ms-2"}

        await store.deregister("ms-2")  # a clean departure: record deleted, `down` published
        for _ in range(100):
            if _servers(sync) == {"ms-1"}:
                break
            await asyncio.sleep(0.02)
        assert _servers(sync) == {"ms-1"}, "a server that left must stop getting calls at once"
    finally:
        await sync.aclose()
        await pool.aclose()
