"""The monitor servicer's shape: every RPC of the contract is implemented and wears @rpc_errors;
unknown figures are left unset rather than sent as zero."""

from __future__ import annotations

import math

from modelyard.v1 import monitor_service_pb2
from monitor_service.collector import VersionStats
from monitor_service.servicer import MonitorServicer, _version_stats


def test_every_rpc_is_implemented_and_maps_its_errors() -> None:
    service = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"]
    assert {m.name for m in service.methods} >= {
        "GetClusterStatus",
        "GetModelStats",
        "ListAlerts",
        "ListCanaryDecisions",
        "WatchEvents",
    }
    for method in service.methods:
        implementation = getattr(MonitorServicer, method.name)
        assert getattr(implementation, "__rpc_errors__", False), f"{method.name} lacks @rpc_errors"


def test_unknown_percentiles_are_unset() -> None:
    message = _version_stats(VersionStats(model="m", version=1, latency_p50_s=0.0125))
    assert message.latency_p50.ToNanoseconds() == 12_500_000
    assert not message.HasField("latency_p99") and math.isnan(VersionStats("m", 1).latency_p99_s)
