"""Faults under steady load, on the whole cluster as child processes (embedded Redis, registry,
two model servers, gateway), with real signals: a drain, a lost membership record, a flushed
Redis, a frozen and a killed model server. Eight callers keep calling through the gateway
with 5 s deadlines; each scenario asserts how many calls may fail (none, except the calls in
flight on a SIGKILLed server) and that every failure got a status well before its deadline.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
import torch

from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.tls import open_channel
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
from modelyard_cli.local_cluster import Child, LocalCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MODEL = "faults"
DEADLINE_S = 5.0
CALLERS = 8


@dataclass
class Load:
    """Outcomes of the callers' calls: (start, seconds, status) each, and wrong answers."""

    calls: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)
    wrong: int = 0

    def failed(self) -> list[tuple[float, float, grpc.StatusCode]]:
        return [c for c in self.calls if c[2] is not grpc.StatusCode.OK]


@dataclass
class Cluster:
    local: LocalCluster
    reference: torch.jit.ScriptModule

    def model_server(self, index: int) -> Child:
        return next(c for c in self.local.children if c.name == f"model-server-{index}")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    local = LocalCluster(data_dir=tmp_path / "cluster", ports="free", model_servers=2)
    try:
        await local.start()
        module, artifact = build_demo_model(seed=5)
        await register_model(
            local.address_of("registry"), MODEL, artifact, demo_signature(), token=local.api_key
        )
        await predict_until_served(local.gateway_address, MODEL, [torch.zeros(1, 64)], token=local.api_key)
        async with CoordinationStore(RedisSettings(url=local.redis_url)) as store:
            # Both model servers hold the version ready.
            end = time.monotonic() + 60
            while True:
                records = [r for r in await store.list_services() if r.kind == "model_server"]
                ready = [r for r in records if any(v.state == "ready" for v in r.versions)]
                if len(ready) == 2:
                    break
                assert time.monotonic() < end, "the model servers never both became ready"
                await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the gateway's table has both
        yield Cluster(local, module)
    finally:
        for child in local.children:  # a frozen child must be able to drain
            if child.process is not None and child.process.poll() is None:
                os.kill(child.process.pid, signal.SIGCONT)
        await local.stop()


async def under_load(cluster: Cluster, fault: Callable[[], Awaitable[None]], *, after_s: float = 4.0) -> Load:
    """Run the callers for 1.5 s, then `fault`, then `after_s` more; collect every outcome."""
    load = Load()
    stop = asyncio.Event()
    rng = torch.Generator().manual_seed(11)
    inputs = [torch.randn(1, 64, generator=rng) for _ in range(32)]
    expected = [cluster.reference(x) for x in inputs]

    async def caller(index: int, stub: inf_grpc.InferenceServiceStub) -> None:
        turn = index
        while not stop.is_set():
            i = turn % len(inputs)
            turn += 1
            started = time.monotonic()
            try:
                reply = await stub.Predict(
                    inf.PredictRequest(model=MODEL, inputs=[tensor_to_proto("input", inputs[i])]),
                    timeout=DEADLINE_S,
                )
            except grpc.aio.AioRpcError as err:
                load.calls.append((started, time.monotonic() - started, err.code()))
                continue
            load.calls.append((started, time.monotonic() - started, grpc.StatusCode.OK))
            if not torch.allclose(tensor_from_proto(reply.outputs[0]), expected[i], rtol=1e-5, atol=1e-6):
                load.wrong += 1

    async with open_channel(cluster.local.gateway_address, None, token=cluster.local.api_key) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        callers = [asyncio.create_task(caller(i, stub)) for i in range(CALLERS)]
        await asyncio.sleep(1.5)
        await fault()
        await asyncio.sleep(after_s)
        stop.set()
        await asyncio.gather(*callers)
    assert load.wrong == 0
    assert len(load.calls) > 100, "too little load to tell"
    return load


def _signal(child: Child, signum: int) -> None:
    assert child.process is not None
    os.kill(child.process.pid, signum)


async def test_a_graceful_drain_loses_no_call(cluster: Cluster) -> None:
    leaving = cluster.model_server(2)

    async def drain() -> None:
        _signal(leaving, signal.SIGTERM)

    load = await under_load(cluster, drain)
    assert load.failed() == []
    assert leaving.process is not None and leaving.process.wait(timeout=30) == 0


async def test_a_lost_membership_record_loses_no_call(cluster: Cluster) -> None:
    server = cluster.model_server(2)

    async def lose_record() -> None:
        async with CoordinationStore(RedisSettings(url=cluster.local.redis_url)) as store:
            await store.deregister(server.service_id)  # the record gone, a `down` event sent

    load = await under_load(cluster, lose_record)
    assert load.failed() == []


async def test_a_flushed_redis_loses_no_call(cluster: Cluster) -> None:
    async def flush() -> None:
        client = aioredis.Redis.from_url(cluster.local.redis_url)
        await client.flushall()
        await client.aclose()

    load = await under_load(cluster, flush, after_s=6.0)
    assert load.failed() == []


async def test_a_frozen_model_server_is_ejected_within_a_second(cluster: Cluster) -> None:
    frozen = cluster.model_server(2)
    froze_at = 0.0

    async def freeze() -> None:
        nonlocal froze_at
        froze_at = time.monotonic()
        _signal(frozen, signal.SIGSTOP)

    try:
        load = await under_load(cluster, freeze, after_s=3.0)
    finally:
        _signal(frozen, signal.SIGCONT)
    # Calls already on it when it froze wait; calls started more than a second later never do.
    slow = [c for c in load.calls if c[1] > 1.0]
    assert all(start < froze_at + 1.0 for start, _, _ in slow), slow
    late = [c for c in load.calls if c[0] > froze_at + 1.0]
    assert len(late) > 50 and all(code is grpc.StatusCode.OK for _, _, code in late)
    assert all(code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED) for _, _, code in load.calls)


async def test_a_killed_model_server_fails_only_its_calls_in_flight_and_fast(cluster: Cluster) -> None:
    killed = cluster.model_server(2)

    async def kill() -> None:
        _signal(killed, signal.SIGKILL)

    load = await under_load(cluster, kill)
    failed = load.failed()
    assert len(failed) <= CALLERS  # at most the calls in flight on it
    assert all(seconds < 1.0 for _, seconds, _ in failed), failed  # a status, not a hang


async def test_the_supervisor_starts_a_killed_child_again_and_the_cluster_stays_up(cluster: Cluster) -> None:
    killed = cluster.model_server(2)
    assert killed.process is not None
    old_pid = killed.process.pid
    notes: list[str] = []

    async def kill_and_supervise() -> None:
        _signal(killed, signal.SIGKILL)
        end = time.monotonic() + 60
        while not (killed.restarts and killed.address):
            assert time.monotonic() < end, f"not started again: {notes}"
            notes.extend(await cluster.local.supervise())
            await asyncio.sleep(0.2)

    load = await under_load(cluster, kill_and_supervise, after_s=1.0)
    assert killed.process is not None and killed.process.pid != old_pid and killed.process.poll() is None
    assert any("exited" in n for n in notes) and any("serves again" in n for n in notes), notes
    assert len(load.failed()) <= CALLERS
    assert cluster.local.check_alive() == []
    # The restarted server serves the model again (its heartbeat says ready).
    async with CoordinationStore(RedisSettings(url=cluster.local.redis_url)) as store:
        end = time.monotonic() + 60
        while True:
            records = {r.id: r for r in await store.list_services()}
            record = records.get(killed.service_id)
            if record is not None and any(v.state == "ready" for v in record.versions):
                break
            assert time.monotonic() < end, "the restarted model server never loaded the model"
            await asyncio.sleep(0.2)
