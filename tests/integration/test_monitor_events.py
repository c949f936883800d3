"""WatchEvents on a real monitor and Redis: alias moves from the cluster's channel, version
loads and unloads the monitor infers from membership, and GetModelStats on an idle cluster."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from typer.testing import CliRunner

from modelyard.coordination import CoordinationStore, ServiceRecord, VersionRecord
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import monitor_service_pb2 as mon
from modelyard.v1 import monitor_service_pb2_grpc as mon_grpc
from modelyard_cli.top import app as top_app
from monitor_service.app import MonitorApp
from monitor_service.settings import MonitorSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def monitor(redis_settings: RedisSettings) -> AsyncIterator[MonitorApp]:
    app = MonitorApp(
        load_settings(
            MonitorSettings,
            server=ServerSettings(port=0, metrics_port=0),
            redis=redis_settings,
            scrape_interval_s=0.1,
        )
    )
    await app.start()
    yield app
    await app.aclose()


async def subscribed(store: CoordinationStore) -> None:
    """Wait until the monitor's watch has subscribed to the events channel."""
    end = time.monotonic() + 10
    channel = store.keys.events_channel()
    while (await store.client.pubsub_numsub(channel))[0][1] < 1:
        assert time.monotonic() < end, "the watch never subscribed"
        await asyncio.sleep(0.01)


async def test_watch_streams_alias_moves_and_version_loads(
    monitor: MonitorApp, store: CoordinationStore
) -> None:
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        stub = mon_grpc.MonitorServiceStub(channel)
        call = stub.WatchEvents(mon.WatchEventsRequest(model="watched"))
        await subscribed(store)

        await store.apply_aliases("other", {"production": 1}, epoch=1)  # filtered out
        await store.apply_aliases("watched", {"production": 3}, epoch=1)
        event = await asyncio.wait_for(call.read(), timeout=10)
        assert (event.type, event.model) == ("aliases", "watched")
        assert "production=v3" in event.summary and json.loads(event.payload_json)["epoch"] == 1

        # A model server that now holds watched v3 ready: the monitor reports the load.
        record = ServiceRecord(
            id="ms-test",
            kind="model_server",
            address="127.0.0.1:1",
            versions=[VersionRecord(model="watched", version=3, state="ready")],
        )
        await store.heartbeat(record, ttl_s=30)
        event = await asyncio.wait_for(call.read(), timeout=10)
        assert (event.type, event.model) == ("load", "watched") and "ms-test" in event.summary

        await monitor.wait_rounds(1)
        stats = await stub.GetModelStats(mon.GetModelStatsRequest(model="watched"))
        (version,) = stats.versions
        assert (version.version, list(version.aliases), version.replicas_ready) == (3, ["production"], 1)
        assert version.request_count == 0 and not version.HasField("latency_p99")
        assert stats.window.seconds == 60 and stats.processes  # the monitor scrapes itself

        await store.deregister("ms-test")
        while True:
            event = await asyncio.wait_for(call.read(), timeout=10)
            if event.type == "unload":
                break
            assert event.type == "service"
        assert event.model == "watched"
        call.cancel()


async def test_top_prints_a_frame_from_a_real_monitor(monitor: MonitorApp, store: CoordinationStore) -> None:
    await store.apply_aliases("watched", {"production": 3}, epoch=1)
    await monitor.wait_rounds(2)
    result = await asyncio.to_thread(
        CliRunner().invoke, top_app, ["--monitor", monitor.address, "--once"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "services" in result.output and monitor.service_id in result.output
    assert "watched" in result.output and "production" in result.output
    assert "firing alerts (0)" in result.output
