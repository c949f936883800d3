"""Routing table, replica choice and the byte-level request rewrite."""

from __future__ import annotations

import random

import pytest

from gateway.forwarder import append_version
from gateway.replica_picker import LeastOutstanding
from gateway.routing_table import Replica, RoutingTable, keep_newer_routes
from modelyard.coordination import Deployment, ServiceRecord, VersionRecord
from modelyard.errors import AliasNotFound, ModelNotFound, NoReadyReplica, VersionNotFound
from modelyard.v1 import inference_service_pb2, model_server_service_pb2, tensor_pb2


def _server(sid: str, *versions: tuple[str, int, str], draining: bool = False) -> ServiceRecord:
    return ServiceRecord(
        id=sid,
        kind="model_server",
        address=f"{sid}:1",
        draining=draining,
        versions=[VersionRecord(model=m, version=v, state=s) for m, v, s in versions],
    )


def test_resolve_follows_aliases_and_explains_what_is_missing() -> None:
    table = RoutingTable.build({"demo": ({"production": 2, "canary": 3}, 5)}, [])
    assert table.resolve("demo", 0, "production") == 2
    assert table.resolve("demo", 0, "canary") == 3
    assert table.resolve("demo", 3, "production") == 3  # an explicit version wins
    # A version nothing serves nor is about to serve is not found (not "retry shortly").
    with pytest.raises(VersionNotFound, match=r"no version 7 deployed \(deployed: 2, 3\)"):
        table.resolve("demo", 7, "production")
    with pytest.raises(AliasNotFound, match=r"no alias 'shadow' \(its aliases: canary, production\)"):
        table.resolve("demo", 0, "shadow")
    with pytest.raises(ModelNotFound, match="'nope'"):
        table.resolve("nope", 0, "production")


def test_only_ready_versions_of_live_servers_route() -> None:
    table = RoutingTable.build(
        {"demo": ({"production": 1}, 1)},
        [
            _server("a", ("demo", 1, "ready"), ("demo", 2, "loading")),
            _server("b", ("demo", 1, "ready")),
            _server("c", ("demo", 1, "ready"), draining=True),
            ServiceRecord(id="g", kind="gateway", address="g:1"),
        ],
    )
    assert {r.server_id for r in table.ready_replicas("demo", 1)} == {"a", "b"}
    with pytest.raises(NoReadyReplica, match="demo v2"):
        table.ready_replicas("demo", 2)


def test_rebuild_keeps_in_flight_counts_of_surviving_replicas() -> None:
    first = RoutingTable.build({}, [_server("a", ("demo", 1, "ready"))])
    first.ready_replicas("demo", 1)[0].outstanding = 3
    second = RoutingTable.build({}, [_server("a", ("demo", 1, "ready"), ("demo", 2, "ready"))], first)
    assert second.ready_replicas("demo", 1)[0].outstanding == 3
    assert second.ready_replicas("demo", 2)[0] is second.ready_replicas("demo", 1)[0]


def test_least_outstanding_prefers_the_idle_replica_and_honours_exclude() -> None:
    busy, idle = Replica("busy", "b:1", outstanding=10), Replica("idle", "i:1")
    picker = LeastOutstanding(random.Random(1))
    assert all(picker.choose([busy, idle]) is idle for _ in range(50))
    assert picker.choose([busy, idle], exclude=idle) is busy
    assert picker.choose([idle], exclude=idle) is None


@pytest.mark.parametrize("version", [1, 127, 128, 300, 2**40])
def test_append_version_makes_a_valid_infer_request(version: int) -> None:
    request = inference_service_pb2.PredictRequest(
        model="demo",
        alias="canary",
        routing_key="user-7",
        request_id="r1",
        inputs=[
            tensor_pb2.Tensor(
                name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[1], raw=b"\x00\x00\x80?"
            )
        ],
    )
    infer = model_server_service_pb2.InferRequest.FromString(
        append_version(request.SerializeToString(), version)
    )
    assert infer.model == "demo"
    assert infer.version == version
    assert infer.request_id == "r1"
    assert infer.inputs[0] == request.inputs[0]


def test_an_older_epoch_in_redis_never_moves_routes_back() -> None:
    current = RoutingTable.build(
        {"demo": ({"production": 3}, 7), "other": ({"production": 1}, 2)},
        [],
        deployments={"demo": Deployment(traffic_split={"production": 100})},
    )
    stale = {"demo": ({"production": 2}, 6), "other": ({"production": 5}, 3)}
    aliases, deployments = keep_newer_routes(current, stale, {})
    assert aliases["demo"] == ({"production": 3}, 7)  # kept: Redis is behind
    assert deployments["demo"].traffic_split == {"production": 100}
    assert aliases["other"] == ({"production": 5}, 3)  # moved forward
