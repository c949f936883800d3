"""The monitor servicer: its contract names the RPCs it serves (each implemented and wearing
@rpc_errors: tests/unit/test_servicer_contract.py); unknown figures are left unset rather than
sent as zero."""

from __future__ import annotations

import math

from modelyard.v1 import monitor_service_pb2
from monitor_service.collector import VersionStats
from monitor_service.servicer import _version_stats


def test_the_contract_names_the_monitor_rpcs() -> None:
    service = monitor_service_pb2.DESCRIPTOR.services_by_name["MonitorService"]
    assert {m.name for m in service.methods} >= {
        "GetClusterStatus",
        "GetModelStats",
        "ListAlerts",
        "ListCanaryDecisions",
        "WatchEvents",
    }


def test_unknown_percentiles_are_unset() -> None:
    message = _version_stats(VersionStats(model="m", version=1, latency_p50_s=0.0125))
    assert message.latency_p50.ToNanoseconds() == 12_500_000
    assert not message.HasField("latency_p99") and math.isnan(VersionStats("m", 1).latency_p99_s)
