"""Shadow mismatches on a real cluster (Redis, a model server, a gateway, a monitor; real
TorchScript models): the monitor reports, per shadow version, the window's mismatch rate and
the largest absolute difference (what torch computes for the inputs sent), `top` shows it, a
`shadow` event is published once, and a shadow identical to the served version matches."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import pytest
import torch
from typer.testing import CliRunner

from gateway.app import GatewayApp
from modelyard.coordination import CoordinationStore, Deployment
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import monitor_service_pb2 as mon
from modelyard.v1 import monitor_service_pb2_grpc as mon_grpc
from modelyard.v1 import tensor_pb2
from modelyard_cli.app import app as cli_app
from modelyard_cli.top import app as top_app
from monitor_service.app import MonitorApp
from monitor_service.settings import MonitorSettings
from tests.integration.conftest import ClusterSource, LaunchGateway, LaunchModelServer, converge

pytestmark = pytest.mark.integration

MODEL = "shadowed"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 8])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3])],
)


def tiny(seed: int) -> torch.jit.ScriptModule:
    """8 → 16 → 3 with ReLU, scripted; each seed gives other weights."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return torch.jit.script(module.eval())


def deployment() -> Deployment:
    return Deployment(placed_versions=[1, 2, 3], shadow_alias="shadow", shadow_fraction=1.0)


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


@pytest.fixture
async def cluster(
    cluster_source: ClusterSource,
    launch_model_server: LaunchModelServer,
    launch_gateway: LaunchGateway,
    store: CoordinationStore,
) -> GatewayApp:
    """v1 serves; v2 has other weights; v3 is v1's module again. The shadow alias is v2."""
    cluster_source.add(MODEL, 1, tiny(1), SIGNATURE)
    cluster_source.add(MODEL, 2, tiny(2), SIGNATURE)
    cluster_source.add(MODEL, 3, tiny(1), SIGNATURE)
    await store.apply_aliases(MODEL, {"production": 1, "shadow": 2}, 1, deployment=deployment())
    await launch_model_server(max_batch_size=16)
    gateway = await launch_gateway()
    await converge(
        lambda: all(len(gateway.dataplane.table.replicas.get((MODEL, v), [])) == 1 for v in (1, 2, 3))
    )
    return gateway


async def subscribed(store: CoordinationStore, watchers: int = 1) -> None:
    """Wait until this many watches of the monitor have subscribed to the events channel."""
    channel = store.keys.events_channel()
    for _ in range(500):
        if (await store.client.pubsub_numsub(channel))[0][1] >= watchers:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{watchers} watches never subscribed")


async def send(gateway: GatewayApp, inputs: list[torch.Tensor]) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        for x in inputs:
            answer = await stub.Predict(
                inf.PredictRequest(model=MODEL, inputs=[tensor_to_proto("input", x)]), timeout=10
            )
            assert answer.version == 1
    await gateway.dataplane.shadow.wait_idle()


async def shadow_of(stub: mon_grpc.MonitorServiceStub, version: int, comparisons: int) -> mon.VersionStats:
    """The version's figures once the monitor has scraped `comparisons` comparisons of it."""
    for _ in range(300):
        stats = await stub.GetModelStats(mon.GetModelStatsRequest(model=MODEL))
        figures = {v.version: v for v in stats.versions}.get(version)
        if figures is not None and figures.shadow.comparisons >= comparisons:
            return figures
        await asyncio.sleep(0.05)
    raise AssertionError(f"the monitor never saw {comparisons} comparisons of v{version}")


async def test_a_shadow_with_other_weights_mismatches_by_what_torch_computes(
    cluster: GatewayApp, monitor: MonitorApp, cluster_source: ClusterSource, store: CoordinationStore
) -> None:
    generator = torch.Generator().manual_seed(24)
    inputs = [torch.randn(1 + i % 4, 8, generator=generator) for i in range(12)]
    expected = max(
        float((cluster_source.run(MODEL, 1, x) - cluster_source.run(MODEL, 2, x)).abs().max()) for x in inputs
    )
    assert expected > 1e-3  # other weights: far outside the tolerances

    async with grpc.aio.insecure_channel(monitor.address) as channel:
        stub = mon_grpc.MonitorServiceStub(channel)
        watch = stub.WatchEvents(mon.WatchEventsRequest(model=MODEL))
        await subscribed(store)
        # `modelyard events` watching too (a second subscriber on the channel).
        listing = asyncio.create_task(
            asyncio.to_thread(
                CliRunner().invoke,
                cli_app,
                [
                    "events",
                    "--monitor",
                    monitor.address,
                    "--model",
                    MODEL,
                    "--type",
                    "shadow",
                    "--count",
                    "1",
                ],
                env={"COLUMNS": "200"},
            )
        )
        await subscribed(store, watchers=2)
        await monitor.wait_rounds(1)  # a scrape before the traffic

        await send(cluster, inputs)
        v2 = await shadow_of(stub, 2, len(inputs))
        assert (v2.shadow.comparisons, v2.shadow.mismatches, v2.shadow.errors) == (12, 12, 0)
        assert v2.shadow.mismatch_rate == 1.0
        assert v2.shadow.max_abs_diff == pytest.approx(expected, rel=1e-5)
        assert list(v2.aliases) == ["shadow"]
        served = {
            v.version: v for v in (await stub.GetModelStats(mon.GetModelStatsRequest(model=MODEL))).versions
        }
        assert not served[1].HasField("shadow")  # the served version is not a shadow

        event = await asyncio.wait_for(next_shadow_event(watch), timeout=10)
        payload = json.loads(event.payload_json)
        assert (payload["version"], payload["state"], payload["comparisons"]) == (2, "mismatching", 12)
        assert payload["mismatch_rate"] == 1.0
        assert payload["max_abs_diff"] == pytest.approx(expected, rel=1e-5)
        assert "shadow shadowed v2 mismatching: 100.0% of 12" in event.summary
        listed = await asyncio.wait_for(listing, timeout=10)
        assert listed.exit_code == 0, listed.output
        assert f"shadow   {MODEL}" in listed.output and event.summary in listed.output
        # Once per change of state, not once per scrape: the log holds one for v2.
        await monitor.wait_rounds(3)
        logged = [
            json.loads(fields["event"]) for _id, fields in await store.client.xrange(store.keys.events_log())
        ]
        assert [e["state"] for e in logged if e.get("type") == "shadow" and e["model"] == MODEL] == [
            "mismatching"
        ]

        result = await asyncio.to_thread(
            CliRunner().invoke, top_app, ["--monitor", monitor.address, "--once"], env={"COLUMNS": "260"}
        )
        assert result.exit_code == 0, result.output
        assert (
            "shadow" in result.output and f"100% of 12 max|Δ| {v2.shadow.max_abs_diff:.2e}" in result.output
        )
        watch.cancel()


async def test_an_identical_shadow_matches(
    cluster: GatewayApp, monitor: MonitorApp, store: CoordinationStore
) -> None:
    await store.apply_aliases(MODEL, {"production": 1, "shadow": 3}, 2, deployment=deployment())
    await cluster.sync.refresh()
    await monitor.wait_rounds(1)
    generator = torch.Generator().manual_seed(25)
    await send(cluster, [torch.randn(3, 8, generator=generator) for _ in range(8)])

    async with grpc.aio.insecure_channel(monitor.address) as channel:
        v3 = await shadow_of(mon_grpc.MonitorServiceStub(channel), 3, 8)
    assert (v3.shadow.comparisons, v3.shadow.mismatches, v3.shadow.mismatch_rate) == (8, 0, 0.0)
    assert v3.shadow.HasField("max_abs_diff") and v3.shadow.max_abs_diff <= 1e-6
    await monitor.wait_rounds(2)
    logged = [
        json.loads(fields["event"]) for _id, fields in await store.client.xrange(store.keys.events_log())
    ]
    # (The process's metrics still hold the other test's v2 comparisons: only v3 is looked at.)
    assert not [e for e in logged if e.get("type") == "shadow" and (e["model"], e["version"]) == (MODEL, 3)]


async def next_shadow_event(
    watch: grpc.aio.UnaryStreamCall[mon.WatchEventsRequest, mon.WatchEventsResponse],
) -> mon.WatchEventsResponse:
    while True:
        event = await watch.read()
        if isinstance(event, mon.WatchEventsResponse) and event.type == "shadow":
            return event
