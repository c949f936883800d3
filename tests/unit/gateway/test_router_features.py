"""The router's routing features on real routing tables, with a recording pool in place of
the network: traffic split, sticky keys, shadow mirroring, passive health, safe retries."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, cast

import grpc
import pytest
import torch

from gateway.dataplane import GatewayDataPlane
from gateway.forwarder import ChannelPool, ReplicaUnavailable
from gateway.outlier import PassiveHealth
from gateway.routing_table import RoutingTable, StaticRoutes
from gateway.traffic import TrafficSplitter
from modelyard.coordination import Deployment, ServiceRecord, VersionRecord
from modelyard.errors import SignatureMismatch
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import model_server_service_pb2 as ms

MODEL = "demo"


def _server(sid: str, *versions: int) -> ServiceRecord:
    return ServiceRecord(
        id=sid,
        kind="model_server",
        address=f"{sid}:1",
        versions=[VersionRecord(model=MODEL, version=v, state="ready") for v in versions],
    )


class _Refused(grpc.aio.AioRpcError):
    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="failed to connect to all addresses",
        )


class RecordingPool:
    """Answers InferRequest bytes as a model server would; per-address behaviour is scripted.

    `outputs[version]` is the output tensor a version returns; `refuse` holds addresses that
    refuse before work; `gate`, when set, holds every call of `gated_version` until set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []
        self.refuse: set[str] = set()
        self.outputs: dict[int, torch.Tensor] = {}
        self.gate: asyncio.Event | None = None
        self.gated_version = 0

    async def infer(self, address: str, request: bytes, timeout_s: float, request_id: str) -> bytes:
        parsed = ms.InferRequest.FromString(request)
        self.calls.append((address, parsed.version, request_id))
        if self.gate is not None and parsed.version == self.gated_version:
            await self.gate.wait()
        if address in self.refuse:
            raise ReplicaUnavailable(_Refused())
        out = self.outputs.get(parsed.version)
        if out is None:  # by default a version answers its input times its number
            out = tensor_from_proto(parsed.inputs[0]) * parsed.version
        return ms.InferResponse(
            model=parsed.model,
            version=parsed.version,
            request_id=request_id,
            outputs=[tensor_to_proto("output", out)],
        ).SerializeToString()


async def _until(condition: Any, turns: int = 1000) -> None:
    """Turn the event loop until `condition()` holds (no timed sleeps)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def _router(pool: RecordingPool, table: RoutingTable, **kwargs: Any) -> GatewayDataPlane:
    return GatewayDataPlane.build(cast(ChannelPool, pool), StaticRoutes(table), **kwargs)


def _request(x: torch.Tensor | None = None, **fields: Any) -> bytes:
    tensor = tensor_to_proto("input", torch.ones(1, 2) if x is None else x)
    return inf.PredictRequest(model=MODEL, inputs=[tensor], **fields).SerializeToString()


def _version_of(answer: bytes) -> int:
    return inf.PredictResponse.FromString(answer).version


def _split_table(split: dict[str, int], **deployment: Any) -> RoutingTable:
    return RoutingTable.build(
        {MODEL: ({"production": 1, "canary": 2}, 3)},
        [_server("a", 1, 2), _server("b", 1, 2), _server("c", 1, 2)],
        deployments={MODEL: Deployment(traffic_split=split, **deployment)},
    )


async def test_split_follows_the_weights_over_5000_calls() -> None:
    pool = RecordingPool()
    router = _router(pool, _split_table({"production": 90, "canary": 10}))
    counts = collections.Counter(
        [_version_of(await router.predict(_request(), 5.0, f"r{i}")) for i in range(5000)]
    )
    assert abs(counts[2] / 5000 - 0.10) <= 0.03 * 0.10  # within ±3 % of the canary's weight
    assert abs(counts[1] / 5000 - 0.90) <= 0.03 * 0.90


async def test_split_by_routing_key_is_sticky_and_near_the_weights() -> None:
    pool = RecordingPool()
    router = _router(pool, _split_table({"production": 70, "canary": 30}))
    first: dict[str, tuple[int, str]] = {}
    for i in range(5000):
        key = f"user-{i}"
        await router.predict(_request(routing_key=key), 5.0, key)
        address, version, _ = pool.calls[-1]
        first[key] = (version, address)
    canary = sum(1 for v, _ in first.values() if v == 2) / 5000
    assert abs(canary - 0.30) <= 0.03  # hashing: ±3 points of the weight
    # Every key again, in another order: the same version and the same replica.
    for key in reversed(list(first)):
        await router.predict(_request(routing_key=key), 5.0, key)
        address, version, _ = pool.calls[-1]
        assert (version, address) == first[key]


async def test_explicit_selectors_bypass_the_split() -> None:
    pool = RecordingPool()
    router = _router(pool, _split_table({"production": 50, "canary": 50}))
    for _ in range(20):
        assert _version_of(await router.predict(_request(alias="production"), 5.0, "r")) == 1
        assert _version_of(await router.predict(_request(version=2), 5.0, "r")) == 2


def test_a_split_naming_a_missing_alias_falls_back_to_the_default() -> None:
    table = RoutingTable.build(
        {MODEL: ({"production": 1}, 1)},
        [_server("a", 1)],
        deployments={MODEL: Deployment(traffic_split={"production": 50, "canary": 50})},
    )
    router = _router(RecordingPool(), table)
    assert {router.router.route(table, MODEL, 0, "").version for _ in range(10)} == {1}


def test_sticky_replica_moves_only_when_its_own_replica_leaves() -> None:
    table = RoutingTable.build({MODEL: ({"production": 1}, 1)}, [_server(s, 1) for s in "abcd"])
    router = _router(RecordingPool(), table)
    replicas = table.ready_replicas(MODEL, 1)
    before = {f"k{i}": router.dispatcher.sticky.choose(replicas, key=f"k{i}") for i in range(400)}
    assert len({r.server_id for r in before.values() if r}) == 4  # keys spread over all four
    remaining = [r for r in replicas if r.server_id != "d"]
    for key, replica in before.items():
        assert replica is not None
        after = router.dispatcher.sticky.choose(remaining, key=key)
        if replica.server_id != "d":
            assert after is replica


def test_splitter_wheel_is_exact_over_a_cycle() -> None:
    splitter = TrafficSplitter()
    picks = collections.Counter(
        splitter.choose(MODEL, {"production": 3, "canary": 1, "off": 0}) for _ in range(400)
    )
    assert picks == {"production": 300, "canary": 100}


async def test_shadow_answers_are_compared_recorded_and_never_returned() -> None:
    pool = RecordingPool()
    pool.outputs = {1: torch.zeros(1, 2), 2: torch.tensor([[0.0, 0.5]])}
    table = RoutingTable.build(
        {MODEL: ({"production": 1, "shadow": 2}, 1)},
        [_server("a", 1), _server("b", 2)],
        deployments={MODEL: Deployment(shadow_alias="shadow", shadow_fraction=0.5)},
    )
    router = _router(pool, table)
    answers = [await router.predict(_request(), 5.0, f"r{i}") for i in range(20)]
    await router.shadow.wait_idle()
    assert {_version_of(a) for a in answers} == {1}
    assert len(router.shadow.records) == 10
    assert {r.outcome for r in router.shadow.records} == {"mismatch"}
    assert all(r.max_abs_diff == pytest.approx(0.5) for r in router.shadow.records)
    assert sum(1 for _, v, _ in pool.calls if v == 2) == 10

    # Equal outputs are recorded as a match.
    pool.outputs[2] = torch.zeros(1, 2)
    await router.predict(_request(), 5.0, "x1")
    await router.predict(_request(), 5.0, "x2")
    await router.shadow.wait_idle()
    assert router.shadow.records[-1].outcome == "match"
    await router.aclose()


async def test_a_slow_shadow_never_delays_the_primary_answer() -> None:
    pool = RecordingPool()
    pool.gate, pool.gated_version = asyncio.Event(), 2  # the shadow version hangs
    table = RoutingTable.build(
        {MODEL: ({"production": 1, "shadow": 2}, 1)},
        [_server("a", 1), _server("b", 2)],
        deployments={MODEL: Deployment(shadow_alias="shadow", shadow_fraction=1.0)},
    )
    router = _router(pool, table)
    assert _version_of(await router.predict(_request(), 5.0, "r1")) == 1
    assert not router.shadow.records  # the copy is still waiting
    pool.gate.set()
    await router.shadow.wait_idle()
    assert router.shadow.records[-1].outcome == "mismatch"  # v1 answers 1.0, v2 answers 2.0
    await router.aclose()


async def test_refusal_is_retried_once_and_the_replica_ejected_then_probed_back() -> None:
    now = [0.0]
    pool = RecordingPool()
    pool.refuse = {"a:1"}
    table = RoutingTable.build({MODEL: ({"production": 1}, 1)}, [_server("a", 1), _server("b", 1)])
    router = _router(pool, table, health=PassiveHealth(threshold=2, eject_s=10.0, clock=lambda: now[0]))
    for i in range(50):
        assert _version_of(await router.predict(_request(), 5.0, f"r{i}")) == 1  # never fails
    assert sum(1 for address, _, _ in pool.calls if address == "a:1") == 2  # then ejected
    a = next(r for r in table.ready_replicas(MODEL, 1) if r.server_id == "a")
    assert a.ejected_until == 10.0

    # After the rest, the next calls probe it again; it answers now, so it is back.
    now[0] = 11.0
    pool.refuse.clear()
    for i in range(50):
        await router.predict(_request(), 5.0, f"p{i}")
    assert a.failures == 0 and a.ejected_until == 0.0
    assert sum(1 for address, _, rid in pool.calls if address == "a:1" and rid.startswith("p")) > 0


async def test_work_that_may_have_run_is_not_retried() -> None:
    class Broken(RecordingPool):
        async def infer(self, address: str, request: bytes, timeout_s: float, request_id: str) -> bytes:
            self.calls.append((address, 1, request_id))
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Socket closed"
            )

    pool = Broken()
    table = RoutingTable.build({MODEL: ({"production": 1}, 1)}, [_server("a", 1), _server("b", 1)])
    router = _router(pool, table)
    with pytest.raises(grpc.aio.AioRpcError):
        await router.predict(_request(), 5.0, "r")
    assert len(pool.calls) == 1


BATCHED = {
    "inputs": [{"name": "input", "dataType": "DATA_TYPE_FP32", "shape": ["-1", "2"]}],
    "outputs": [{"name": "output", "dataType": "DATA_TYPE_FP32", "shape": ["-1", "2"]}],
}


def _batched_table() -> RoutingTable:
    record = ServiceRecord(
        id="a",
        kind="model_server",
        address="a:1",
        versions=[VersionRecord(model=MODEL, version=3, state="ready", signature=BATCHED)],
    )
    return RoutingTable.build({MODEL: ({"production": 3}, 1)}, [record])


async def test_calls_waiting_for_a_busy_version_are_coalesced_and_split_back_by_rows() -> None:
    pool = RecordingPool()
    pool.gate, pool.gated_version = asyncio.Event(), 3
    router = _router(pool, _batched_table(), coalesce=True, coalesce_max_in_flight=1)
    first = asyncio.create_task(router.predict(_request(torch.ones(1, 2)), 5.0, "first"))
    await _until(lambda: len(pool.calls) == 1)  # a lone call goes at once, as it came
    xs = [torch.randn(n, 2) for n in (1, 2, 1, 3)]
    own_ids = ["", "mine-1", "", "mine-3"]
    waiting = [
        asyncio.create_task(router.predict(_request(x, request_id=own_ids[i]), 5.0, f"r{i}"))
        for i, x in enumerate(xs)
    ]
    # A call that breaks the signature is refused before it could join anyone.
    with pytest.raises(SignatureMismatch):
        await router.predict(_request(torch.randn(1, 5)), 5.0, "odd")
    for _ in range(50):
        await asyncio.sleep(0)
    assert len(pool.calls) == 1  # the version is busy: the others wait in groups
    pool.gate.set()
    answers = await asyncio.gather(*waiting)
    await first
    # One call for the four compatible ones, under a request id of its own (no member's).
    assert len(pool.calls) == 2 and pool.calls[0][2] == "first"
    assert pool.calls[1][2] not in {"first", "r0", "r1", "r2", "r3", *own_ids}
    for i, (x, raw) in enumerate(zip(xs, answers, strict=True)):
        answer = inf.PredictResponse.FromString(raw)
        # The caller's own request id when it sent one, else the gateway's.
        assert (answer.version, answer.request_id) == (3, own_ids[i] or f"r{i}")
        torch.testing.assert_close(tensor_from_proto(answer.outputs[0]), x * 3)
    assert router.coalescer is not None
    assert (router.coalescer.calls, router.coalescer.members) == (2, 5)
    await router.aclose()


async def test_a_failed_coalesced_call_fails_each_of_its_callers() -> None:
    pool = RecordingPool()
    pool.refuse = {"a:1"}  # the only replica refuses: nothing to retry on
    pool.gate, pool.gated_version = asyncio.Event(), 3
    router = _router(pool, _batched_table(), coalesce=True, coalesce_max_in_flight=1)
    calls = [asyncio.create_task(router.predict(_request(), 5.0, f"r{i}")) for i in range(4)]
    await _until(lambda: len(pool.calls) == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    pool.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert len(pool.calls) == 2  # the first alone, then the three that waited, joined
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    await router.aclose()


async def test_access_log_names_the_route_and_never_the_payload(caplog: pytest.LogCaptureFixture) -> None:
    pool = RecordingPool()
    router = _router(pool, _split_table({}), access_log_enabled=True)
    secret = torch.full((1, 2), 1234.5)
    with caplog.at_level(logging.INFO, logger="modelyard.gateway.access"):
        await router.predict(_request(secret, routing_key="user-42"), 5.0, "req-1")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "modelyard.gateway.access"]
    assert "model=demo version=1 alias=production key=yes code=OK" in line
    assert "request_id=req-1" in line
    assert "1234" not in line and "user-42" not in line
