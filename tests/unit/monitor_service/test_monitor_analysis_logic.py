"""Pure logic of the monitor: quantiles from bucket deltas, window deltas per process, the
alert cycle, the Alertmanager payload and drift scores (canary walks are in
test_monitor_canary_walks)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from monitor_service.alerting import AlertManager, AlertState, WebhookNotifier, alertmanager_payload
from monitor_service.collector import (
    FeatureStats,
    ProcessView,
    Snapshot,
    VersionStats,
    _version_stats,
    histogram_quantile,
    parse_snapshot,
)
from monitor_service.drift import DriftDetector
from monitor_service.rules import AlertRule, Baseline


def test_quantiles_interpolate_inside_the_bucket() -> None:
    buckets = [(0.1, 10.0), (0.2, 60.0), (0.4, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.18)  # rank 50: 40/50 of 0.1..0.2
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.395)
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 100.0)]) == 0.1


METRICS = """\
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.0
# TYPE modelyard_model_server_requests_total counter
modelyard_model_server_requests_total{model="m",version="2",code="OK"} 90.0
modelyard_model_server_requests_total{model="m",version="2",code="INTERNAL"} 10.0
# TYPE modelyard_model_server_request_seconds histogram
modelyard_model_server_request_seconds_bucket{model="m",version="2",le="0.1"} 50.0
modelyard_model_server_request_seconds_bucket{model="m",version="2",le="0.2"} 100.0
modelyard_model_server_request_seconds_bucket{model="m",version="2",le="+Inf"} 100.0
modelyard_model_server_request_seconds_count{model="m",version="2"} 100.0
modelyard_model_server_request_seconds_sum{model="m",version="2"} 12.0
# TYPE modelyard_model_server_queue_depth gauge
modelyard_model_server_queue_depth{model="m",version="2"} 3.0
# TYPE modelyard_rpc_server_handled_total counter
modelyard_rpc_server_handled_total{grpc_service="x",grpc_method="y",grpc_code="OK"} 5.0
"""


def test_a_window_is_the_delta_since_its_start_per_process() -> None:
    values = parse_snapshot(METRICS)
    assert values[("req", "m", 2, "OK")] == 90.0 and values[("lat_b", "m", 2, "0.1")] == 50.0
    assert ("start", "", 0, "") in values and not any(k[0] == "rpc" for k in values)

    process = ProcessView(("127.0.0.1", 1000.0), start_time=1000.0)
    earlier = {
        **values,
        ("req", "m", 2, "OK"): 40.0,
        ("req", "m", 2, "INTERNAL"): 0.0,
        ("lat_b", "m", 2, "0.1"): 30.0,
        ("lat_b", "m", 2, "0.2"): 40.0,
        ("lat_b", "m", 2, "+Inf"): 40.0,
        ("depth", "m", 2, ""): 9.0,
    }
    process.snapshots.extend([Snapshot(2000.0, earlier), Snapshot(2060.0, values)])
    delta = process.delta(since=2000.0)
    assert delta[("req", "m", 2, "OK")] == 50.0 and delta[("req", "m", 2, "INTERNAL")] == 10.0
    assert delta[("depth", "m", 2, "")] == 3.0  # a gauge: its newest value

    grouped = {(what, detail): v for (what, model, version, detail), v in delta.items() if model}
    stats = _version_stats(("m", 2), grouped, 60.0)
    assert stats.request_count == 60 and stats.error_rate == pytest.approx(10 / 60)
    assert stats.requests_per_second == 1.0
    # 20 in (0, 0.1], 40 in (0.1, 0.2]: the median is 10/40 of the way into the second bucket.
    assert stats.latency_p50_s == pytest.approx(0.125)
    # A process that started inside the window counts from zero.
    assert (
        ProcessView(("h", 2030.0), start_time=2030.0, snapshots=process.snapshots).delta(2000.0)[
            ("req", "m", 2, "OK")
        ]
        == 90.0
    )


def test_an_input_whose_statistics_started_again_counts_its_sums_from_zero() -> None:
    # v1 was unloaded (the model server forgot its series) and loaded again inside the window;
    # v2 ran on. Without the restart, v1's sums would come out as 12 - 400 = -388.
    process = ProcessView(("h", 1000.0), start_time=1000.0)
    before = {
        ("in_n", "m", 1, "x"): 100.0,
        ("in_s", "m", 1, "x/0"): 400.0,
        ("in_q", "m", 1, "x/0"): 1700.0,
        ("in_n", "m", 2, "x"): 100.0,
        ("in_s", "m", 2, "x/0"): 400.0,
    }
    after = {
        ("in_n", "m", 1, "x"): 3.0,
        ("in_s", "m", 1, "x/0"): 12.0,
        ("in_q", "m", 1, "x/0"): 50.0,
        ("in_n", "m", 2, "x"): 110.0,
        ("in_s", "m", 2, "x/0"): 390.0,  # a sum may go down: its items' values were negative
    }
    process.snapshots.extend([Snapshot(2000.0, before), Snapshot(2060.0, after)])
    delta = process.delta(since=2000.0)
    assert delta[("in_n", "m", 1, "x")] == 3.0
    assert delta[("in_s", "m", 1, "x/0")] == 12.0 and delta[("in_q", "m", 1, "x/0")] == 50.0
    assert delta[("in_n", "m", 2, "x")] == 10.0 and delta[("in_s", "m", 2, "x/0")] == -10.0


def stats(model: str = "m", version: int = 1, **values: Any) -> VersionStats:
    return VersionStats(model=model, version=version, **values)


class RecordingNotifier(WebhookNotifier):
    def __init__(self) -> None:
        super().__init__([])
        self.sent: list[tuple[str, str]] = []

    def notify(self, alerts: Any) -> None:
        self.sent += [(a.name, a.state.value) for a in alerts]


async def test_an_alert_goes_pending_firing_resolved() -> None:
    notifier = RecordingNotifier()
    manager = AlertManager(notifier)
    rule = AlertRule("Errors", "error_rate", 0.1, for_s=10.0, min_requests=5)
    bad = {("m", 1): stats(request_count=100, error_rate=0.3)}
    good = {("m", 1): stats(request_count=100, error_rate=0.0)}

    await manager.evaluate([rule], bad, now=100.0)
    (alert,) = manager.alerts()
    assert alert.state is AlertState.PENDING and notifier.sent == []
    await manager.evaluate([rule], bad, now=109.0)
    assert alert.state is AlertState.PENDING
    await manager.evaluate([rule], bad, now=110.0)
    assert alert.state is AlertState.FIRING and notifier.sent == [("Errors", "firing")]
    await manager.evaluate([rule], bad, now=111.0)
    assert notifier.sent == [("Errors", "firing")]  # told once
    await manager.evaluate([rule], good, now=120.0)
    assert alert.state is AlertState.RESOLVED and notifier.sent[-1] == ("Errors", "resolved")
    assert manager.alerts() == [] and manager.alerts(include_resolved=True) == [alert]

    # Too few requests never match; a pending alert that clears is forgotten silently.
    await manager.evaluate([rule], {("m", 1): stats(request_count=4, error_rate=1.0)}, now=130.0)
    assert manager.alerts() == []
    await manager.evaluate([rule], bad, now=140.0)
    await manager.evaluate([rule], good, now=141.0)
    assert manager.alerts() == [] and len(notifier.sent) == 2


async def test_rules_select_models_and_aliases() -> None:
    manager = AlertManager(RecordingNotifier())
    rule = AlertRule("Depth", "queue_depth", 5, model="a", alias="production")
    figures = {
        ("a", 1): stats("a", 1, queue_depth=9, aliases=["production"]),
        ("a", 2): stats("a", 2, queue_depth=9, aliases=["canary"]),
        ("b", 1): stats("b", 1, queue_depth=9, aliases=["production"]),
        ("a", 3): stats("a", 3, aliases=["production"], replicas_ready=0),
    }
    await manager.evaluate([rule, AlertRule("NoReplica", "no_ready_replica", 0.5)], figures, now=1.0)
    assert sorted((a.name, a.labels["model"], a.labels["version"]) for a in manager.alerts()) == [
        ("Depth", "a", "1"),
        ("NoReplica", "a", "1"),
        ("NoReplica", "a", "2"),
        ("NoReplica", "a", "3"),
        ("NoReplica", "b", "1"),
    ]


async def test_the_webhook_payload_is_alertmanagers() -> None:
    manager = AlertManager(RecordingNotifier())
    alert = await manager.fire_once(
        "CanaryRolledBack", {"model": "m", "version": "2"}, {"summary": "s"}, 0.2, 0.05, now=0.0, hold_s=60.0
    )
    payload = alertmanager_payload([alert], receiver="modelyard")
    assert payload["version"] == "4" and payload["status"] == "firing" and payload["receiver"] == "modelyard"
    assert payload["groupLabels"] == {"alertname": "CanaryRolledBack"}
    (item,) = payload["alerts"]
    assert item["startsAt"] == "1970-01-01T00:00:00.000Z" and item["endsAt"] == "1970-01-01T00:01:00.000Z"
    assert set(item) == {
        "status",
        "labels",
        "annotations",
        "startsAt",
        "endsAt",
        "generatorURL",
        "fingerprint",
    }
    await manager.evaluate([], {}, now=61.0)
    assert alert.state is AlertState.RESOLVED


def test_drift_is_the_largest_standardised_mean_shift() -> None:
    detector = DriftDetector({"m": {"input": Baseline([0.0, 10.0], [1.0, 2.0])}}, min_items=50)
    figures = {
        ("m", 1): stats(
            inputs={"input/0": FeatureStats(100, 0.1, 1.0), "input/1": FeatureStats(100, 13.0, 4.0)}
        )
    }
    detector.apply(figures)
    assert figures[("m", 1)].input_drift == pytest.approx(1.5)
    few = {("m", 1): stats(inputs={"input/1": FeatureStats(10, 13.0, 4.0)})}
    detector.apply(few)
    assert math.isnan(few[("m", 1)].input_drift)  # too few items: no data, not "no drift"

    learner = DriftDetector(learn_items=100)
    learner.apply({("n", 1): stats("n", inputs={"x/0": FeatureStats(100, 5.0, 4.0)})})
    assert learner.learned["n"]["x"] == Baseline([5.0], [2.0])
