"""The gateway on real Redis, real model servers (port 0) and real TorchScript models:
traffic split, sticky keys, shadow mirroring, deadline propagation, a replica killed under
load, PredictStream, and the degraded routing table in health and metrics."""

from __future__ import annotations

import asyncio
import collections
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import ROUTING_HEALTH_SERVICE, GatewayApp
from gateway.settings import GatewaySettings
from model_server.app import ModelServerApp
from modelyard.coordination import CoordinationStore, Deployment, ServiceRecord, VersionRecord
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import tensor_pb2
from modelyard_cli.embedded_redis import RedisServer
from tests.integration.conftest import ClusterSource, LaunchGateway, LaunchModelServer, converge

pytestmark = pytest.mark.integration

MODEL = "tiny"
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 8])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 3])],
)


def tiny(seed: int) -> torch.jit.ScriptModule:
    """8 → 16 → 3 with ReLU, scripted; each seed gives other weights."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return torch.jit.script(module.eval())


@pytest.fixture
def source(cluster_source: ClusterSource) -> ClusterSource:
    cluster_source.add(MODEL, 1, tiny(1), SIGNATURE)
    cluster_source.add(MODEL, 2, tiny(2), SIGNATURE)
    return cluster_source


StartModelServer = LaunchModelServer


@pytest.fixture
def start_model_server(source: ClusterSource, launch_model_server: LaunchModelServer) -> StartModelServer:
    """Model servers of `source`, batching up to 16 items."""

    async def start(**overrides: Any) -> ModelServerApp:
        return await launch_model_server(**{"max_batch_size": 16, **overrides})

    return start


@pytest.fixture
async def gateway(launch_gateway: LaunchGateway) -> GatewayApp:
    return await launch_gateway()


eventually = converge


@pytest.fixture
async def stub(gateway: GatewayApp) -> AsyncIterator[inf_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        yield inf_grpc.InferenceServiceStub(channel)


async def serving(gateway: GatewayApp, versions: dict[int, int]) -> None:
    """Wait until the gateway routes each version to the given number of replicas."""
    await eventually(
        lambda: all(
            len(gateway.dataplane.table.replicas.get((MODEL, v), [])) == n for v, n in versions.items()
        )
    )


def predict(x: torch.Tensor, **fields: Any) -> inf.PredictRequest:
    return inf.PredictRequest(model=MODEL, inputs=[tensor_to_proto("input", x)], **fields)


def output_of(response: inf.PredictResponse) -> torch.Tensor:
    return tensor_from_proto(response.outputs[0])


def metrics_text(app: GatewayApp) -> str:
    assert app.server.metrics is not None
    url = f"http://127.0.0.1:{app.server.metrics.port}/metrics"
    return urllib.request.urlopen(url, timeout=5).read().decode()


# -- version selection ----------------------------------------------------------------------


async def test_split_sends_the_configured_share_and_keys_stay_put(
    gateway: GatewayApp,
    start_model_server: StartModelServer,
    store: CoordinationStore,
    stub: inf_grpc.InferenceServiceStub,
    source: ClusterSource,
) -> None:
    await store.apply_aliases(
        MODEL,
        {"production": 1, "canary": 2},
        1,
        deployment=Deployment(placed_versions=[1, 2], traffic_split={"production": 75, "canary": 25}),
    )
    await start_model_server()
    await start_model_server()
    await serving(gateway, {1: 2, 2: 2})

    x = torch.randn(1, 8)
    answers = await asyncio.gather(*(stub.Predict(predict(x), timeout=10) for _ in range(200)))
    counts = collections.Counter(a.version for a in answers)
    assert counts == {1: 150, 2: 50}  # smooth weighted round robin: exact on one gateway
    for answer in answers:
        torch.testing.assert_close(output_of(answer), source.run(MODEL, answer.version, x))

    # Sticky keys: the same key always lands on the same version.
    first = {}
    for i in range(40):
        first[f"user-{i}"] = (await stub.Predict(predict(x, routing_key=f"user-{i}"), timeout=10)).version
    assert set(first.values()) == {1, 2}
    for key, version in first.items():
        for _ in range(3):
            assert (await stub.Predict(predict(x, routing_key=key), timeout=10)).version == version

    # Explicit selectors bypass the split.
    assert (await stub.Predict(predict(x, alias="canary"), timeout=10)).version == 2
    assert (await stub.Predict(predict(x, version=1), timeout=10)).version == 1

    body = await asyncio.to_thread(metrics_text, gateway)
    assert f'modelyard_gateway_requests_total{{alias="canary",code="OK",model="{MODEL}",version="2"}}' in body


async def test_shadow_answers_are_recorded_never_returned(
    gateway: GatewayApp,
    start_model_server: StartModelServer,
    store: CoordinationStore,
    stub: inf_grpc.InferenceServiceStub,
    source: ClusterSource,
) -> None:
    await store.apply_aliases(
        MODEL,
        {"production": 1, "shadow": 2},
        1,
        deployment=Deployment(placed_versions=[1, 2], shadow_alias="shadow", shadow_fraction=0.5),
    )
    await start_model_server()
    await serving(gateway, {1: 1, 2: 1})

    x = torch.randn(4, 8)
    for _ in range(20):
        answer = await stub.Predict(predict(x), timeout=10)
        assert answer.version == 1
        torch.testing.assert_close(output_of(answer), source.run(MODEL, 1, x))
    await gateway.dataplane.shadow.wait_idle()
    records = list(gateway.dataplane.shadow.records)
    assert len(records) == 10
    expected_diff = float((source.run(MODEL, 1, x) - source.run(MODEL, 2, x)).abs().max())
    for record in records:
        assert (record.version, record.shadow_version, record.outcome) == (1, 2, "mismatch")
        assert record.max_abs_diff == pytest.approx(expected_diff, rel=1e-5)
    body = await asyncio.to_thread(metrics_text, gateway)
    assert (
        f'modelyard_gateway_shadow_comparisons_total{{model="{MODEL}",outcome="mismatch",'
        'shadow_version="2",version="1"} 10.0'
    ) in body


# -- failure handling -----------------------------------------------------------------------


async def test_deadline_reaches_the_model_server(
    gateway: GatewayApp,
    store: CoordinationStore,
    stub: inf_grpc.InferenceServiceStub,
) -> None:
    # A stand-in model server (a real grpc server) that records the deadline it was given.
    seen: list[float | None] = []

    async def infer(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append(context.time_remaining())
        parsed = ms.InferRequest.FromString(request)
        return ms.InferResponse(model=parsed.model, version=parsed.version).SerializeToString()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "modelyard.v1.ModelServerService", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await store.apply_aliases(MODEL, {"production": 1}, 1)
        await store.heartbeat(
            ServiceRecord(
                id="stand-in",
                kind="model_server",
                address=f"127.0.0.1:{port}",
                versions=[VersionRecord(model=MODEL, version=1, state="ready")],
            ),
            ttl_s=30,
        )
        await serving(gateway, {1: 1})
        await stub.Predict(predict(torch.zeros(1, 8)), timeout=3.0)
        await stub.Predict(predict(torch.zeros(1, 8)), timeout=0.75)
    finally:
        await server.stop(None)
    # The caller's remaining time, not the gateway's 30 s default (grpc-timeout rounds up a
    # little on the wire).
    assert seen[0] is not None and 2.0 < seen[0] <= 3.05
    assert seen[1] is not None and 0.0 < seen[1] <= 0.8


async def test_a_replica_killed_under_load_fails_no_call_that_had_not_reached_it(
    gateway: GatewayApp,
    start_model_server: StartModelServer,
    store: CoordinationStore,
    stub: inf_grpc.InferenceServiceStub,
) -> None:
    await store.apply_aliases(MODEL, {"production": 1}, 1)
    survivor = await start_model_server()
    victim = await start_model_server()
    await serving(gateway, {1: 2})
    replica_of = {r.server_id: r for r in gateway.dataplane.table.replicas[(MODEL, 1)]}

    ok = 0
    failures: list[grpc.aio.AioRpcError] = []
    stop = asyncio.Event()
    x = torch.randn(1, 8)

    async def caller() -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                await stub.Predict(predict(x), timeout=10)
                ok += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)

    callers = [asyncio.create_task(caller()) for _ in range(8)]
    await eventually(lambda: ok >= 100)
    # The crash: no deregistration (the record stays until it expires), connections cut.
    await victim.heartbeat.aclose(deregister=False)
    # Counted with no await before the cut, so no call can reach the victim in between.
    reached = replica_of[victim.service_id].outstanding
    await victim.server.server.stop(None)
    after_kill = ok
    await eventually(lambda: ok >= after_kill + 300)
    stop.set()
    await asyncio.gather(*callers)

    # Only calls already in flight on the victim may fail; everything else was retried or
    # routed to the survivor, and the victim was ejected by passive health.
    assert len(failures) <= reached, [f.details() for f in failures]
    assert all(f.code() is grpc.StatusCode.UNAVAILABLE for f in failures)
    assert replica_of[victim.service_id].ejected_until > 0 or victim.service_id not in {
        r.server_id for r in gateway.dataplane.table.replicas.get((MODEL, 1), [])
    }
    assert survivor.service_id in {r.server_id for r in gateway.dataplane.table.replicas[(MODEL, 1)]}


async def test_predict_stream_matches_answers_to_requests(
    gateway: GatewayApp,
    start_model_server: StartModelServer,
    store: CoordinationStore,
    stub: inf_grpc.InferenceServiceStub,
    source: ClusterSource,
) -> None:
    await store.apply_aliases(MODEL, {"production": 1}, 1)
    await start_model_server()
    await serving(gateway, {1: 1})
    inputs = {f"req-{i}": torch.randn(1, 8) for i in range(30)}

    async def requests() -> AsyncIterator[inf.PredictStreamRequest]:
        for rid, x in inputs.items():
            yield inf.PredictStreamRequest(request=predict(x, request_id=rid))
        yield inf.PredictStreamRequest(request=predict(torch.zeros(1, 8), alias="nope", request_id="bad"))

    answers: dict[str, torch.Tensor] = {}
    errors = {}
    async for message in stub.PredictStream(requests(), timeout=30):
        if message.HasField("response"):
            answers[message.response.request_id] = output_of(message.response)
        else:
            errors[message.error.request_id] = message.error
    assert answers.keys() == inputs.keys()
    for rid, x in inputs.items():
        torch.testing.assert_close(answers[rid], source.run(MODEL, 1, x))
    assert errors["bad"].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert errors["bad"].reason == "ALIAS_NOT_FOUND"


async def test_degraded_routing_is_reported_and_the_last_table_kept() -> None:
    with RedisServer() as redis_server:
        settings = RedisSettings(url=redis_server.url, socket_timeout_s=0.5, retries=0)
        async with CoordinationStore(settings) as writer:
            await writer.apply_aliases(MODEL, {"production": 1}, 1)
        app = GatewayApp(
            load_settings(
                GatewaySettings,
                server=ServerSettings(port=0, metrics_port=0, drain_grace_s=0.5),
                redis=settings,
                resync_interval_s=60,
            )
        )
        await app.start()
        try:
            async with grpc.aio.insecure_channel(app.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest(service=ROUTING_HEALTH_SERVICE)
                assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING

                # A flushed (or replaced) Redis is not a cluster without models: keep routing.
                async with CoordinationStore(settings) as writer:
                    await writer.client.flushdb()
                await app.sync.refresh()
                assert app.sync.degraded
                assert app.dataplane.table.resolve(MODEL, 0, "production") == 1

                redis_server.stop()
                await app.sync.refresh()
                assert app.sync.degraded
                assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
                whole = await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert whole.status == health_pb2.HealthCheckResponse.SERVING
                assert app.dataplane.table.resolve(MODEL, 0, "production") == 1  # last table kept
                body = await asyncio.to_thread(metrics_text, app)
                assert f'modelyard_gateway_routing_degraded{{gateway="{app.service_id}"}} 1.0' in body
        finally:
            await app.aclose()
