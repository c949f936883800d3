"""Gateway and monitor on real Redis and real servers: health, reflection, /metrics,
membership, and precise errors when nothing can serve."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import monitor_service_pb2 as mon
from modelyard.v1 import monitor_service_pb2_grpc as mon_grpc
from monitor_service.app import MonitorApp
from monitor_service.settings import MonitorSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(redis_settings: RedisSettings) -> AsyncIterator[GatewayApp]:
    app = GatewayApp(
        load_settings(GatewaySettings, server=ServerSettings(port=0, metrics_port=0), redis=redis_settings)
    )
    await app.start()
    yield app
    await app.aclose()


@pytest.fixture
async def monitor(redis_settings: RedisSettings) -> AsyncIterator[MonitorApp]:
    app = MonitorApp(
        load_settings(MonitorSettings, server=ServerSettings(port=0, metrics_port=0), redis=redis_settings)
    )
    await app.start()
    yield app
    await app.aclose()


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # aio errors carry the same metadata
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    raise AssertionError("no ErrorInfo in the status")


async def test_health_reflection_and_metrics(gateway: GatewayApp) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "modelyard.v1.InferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        names = {s.name for s in answer.list_services_response.service}
        assert {"modelyard.v1.InferenceService", "grpc.health.v1.Health"} <= names

        with pytest.raises(grpc.aio.AioRpcError):
            await inf_grpc.InferenceServiceStub(channel).Predict(inf.PredictRequest(model="x"))

    assert gateway.server.metrics is not None
    url = f"http://127.0.0.1:{gateway.server.metrics.port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert 'modelyard_rpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="Predict"' in body


async def test_unknown_model_and_alias_are_not_found(gateway: GatewayApp, store: CoordinationStore) -> None:
    await store.apply_aliases("demo", {"production": 1}, epoch=1)
    await gateway.sync.refresh()
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(inf.PredictRequest(model="nope"))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert _reason(err.value) == "MODEL_NOT_FOUND"
        assert "'nope'" in (err.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(inf.PredictRequest(model="demo", alias="canary"))
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        assert _reason(err.value) == "ALIAS_NOT_FOUND"

        # The alias exists but no model server holds the version: retryable UNAVAILABLE.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(inf.PredictRequest(model="demo"))
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
        assert _reason(err.value) == "NO_READY_REPLICA"

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predict(inf.PredictRequest())
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_monitor_reports_services_up_then_down(gateway: GatewayApp, monitor: MonitorApp) -> None:
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        stub = mon_grpc.MonitorServiceStub(channel)
        status = await stub.GetClusterStatus(mon.GetClusterStatusRequest())
        kinds = {s.kind: s for s in status.services}
        assert kinds[mon.SERVICE_KIND_GATEWAY].address == gateway.address
        assert kinds[mon.SERVICE_KIND_GATEWAY].state == mon.SERVICE_STATE_UP
        assert kinds[mon.SERVICE_KIND_MONITOR].state == mon.SERVICE_STATE_UP

        await gateway.aclose()
        status = await stub.GetClusterStatus(mon.GetClusterStatusRequest())
        states = {s.kind: s.state for s in status.services}
        assert states[mon.SERVICE_KIND_GATEWAY] == mon.SERVICE_STATE_DOWN


async def test_a_just_written_alias_routes_without_waiting_for_the_event(
    gateway: GatewayApp, store: CoordinationStore
) -> None:
    # With its event and timer loops stopped, only the refresh on a miss can find the alias.
    await gateway.sync.aclose()
    await store.apply_aliases("fresh", {"production": 1}, epoch=1)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await inf_grpc.InferenceServiceStub(channel).Predict(inf.PredictRequest(model="fresh"))
    # Routed as far as the (missing) replica: the gateway knew the alias.
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _reason(err.value) == "NO_READY_REPLICA"


async def test_cluster_status_says_where_every_services_metrics_are(
    gateway: GatewayApp, monitor: MonitorApp
) -> None:
    async with grpc.aio.insecure_channel(monitor.address) as channel:
        status = await mon_grpc.MonitorServiceStub(channel).GetClusterStatus(mon.GetClusterStatusRequest())
    by_id = {s.id: s for s in status.services}
    for app in (gateway, monitor):
        service = by_id[app.service_id]
        # Port 0 for /metrics: a free port, not the gRPC port + 1000.
        assert service.metrics_address == app.server.metrics_address
        assert service.metrics_address != f"127.0.0.1:{app.port + 1000}"
        assert service.metrics_scheme == "http"
        url = f"{service.metrics_scheme}://{service.metrics_address}/metrics"
        body = await asyncio.to_thread(_get, url)
        assert "# TYPE process_start_time_seconds gauge" in body
        assert "modelyard_rpc_server_handled" in body


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()
