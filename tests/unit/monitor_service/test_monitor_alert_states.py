"""Alert states that tell the truth: data running out is 'no data', not 'resolved'; an alert
resolves only when its expression is evaluated on enough data and found false (for the rule's
keep_firing_for); the webhook and the RPC say which."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from modelyard.v1 import monitor_service_pb2 as pb
from monitor_service.alerting import AlertManager, AlertState, WebhookNotifier, alertmanager_payload
from monitor_service.collector import VersionStats
from monitor_service.rules import AlertRule, parse_rules
from monitor_service.servicer import _alert


class RecordingNotifier(WebhookNotifier):
    def __init__(self) -> None:
        super().__init__([])
        self.sent: list[dict[str, Any]] = []

    def notify(self, alerts: Any) -> None:
        # As sent: the real notifier serialises at once, and an alert's annotations change later.
        self.sent.append(json.loads(json.dumps(alertmanager_payload(alerts, receiver="test"))))

    def states(self) -> list[str]:
        return [p["alerts"][0]["annotations"].get("state", p["alerts"][0]["status"]) for p in self.sent]


def stats(**values: Any) -> dict[tuple[str, int], VersionStats]:
    return {("m", 1): VersionStats(model="m", version=1, aliases=["production"], **values)}


SLOW = AlertRule("SlowP99", "latency_p99", 0.25, min_requests=100)
SLOW_FIGURES = stats(request_count=500, latency_p99_s=0.4)
FAST_FIGURES = stats(request_count=500, latency_p99_s=0.05)
QUIET_FIGURES = stats(request_count=12, latency_p99_s=0.111)  # the last value


async def test_a_firing_alert_whose_traffic_stops_goes_to_no_data_not_resolved() -> None:
    notifier = RecordingNotifier()
    changes: list[str] = []

    async def record(alert: Any) -> None:
        changes.append(alert.state.value)

    manager = AlertManager(notifier, on_change=record)
    await manager.evaluate([SLOW], SLOW_FIGURES, now=0.0)
    (alert,) = manager.alerts()
    assert alert.state is AlertState.FIRING

    # Traffic stops: too few requests in the window to judge the p99.
    await manager.evaluate([SLOW], QUIET_FIGURES, now=34.0)
    assert alert.state is AlertState.NO_DATA and alert.no_data_at == 34.0
    assert alert.value == 0.4  # the last value on data, not the stale one
    assert notifier.states() == ["firing", "no_data"] and changes == ["firing", "no_data"]
    payload = notifier.sent[-1]
    assert payload["status"] == "firing"  # Alertmanager's receivers still hold it as firing
    (item,) = payload["alerts"]
    assert item["status"] == "firing" and item["endsAt"] == "0001-01-01T00:00:00Z"
    assert item["annotations"]["state"] == "no_data"
    assert item["annotations"]["no_data_since"] == "1970-01-01T00:00:34.000Z"
    message = _alert(alert)
    assert message.state == pb.ALERT_STATE_NO_DATA and message.no_data_time.seconds == 34
    assert not message.HasField("resolve_time")

    # Still no data, then the version leaves the figures altogether: still not resolved.
    await manager.evaluate([SLOW], QUIET_FIGURES, now=60.0)
    await manager.evaluate([SLOW], {}, now=600.0)
    assert alert.state is AlertState.NO_DATA and len(notifier.sent) == 2
    assert manager.alerts() == [alert]

    # Data back and healthy: now it resolves, with the evidence as its value.
    await manager.evaluate([SLOW], FAST_FIGURES, now=700.0)
    assert alert.state is AlertState.RESOLVED and alert.resolved_at == 700.0 and alert.value == 0.05
    assert "state" not in alert.annotations and "no_data_since" not in alert.annotations
    assert notifier.states() == ["firing", "no_data", "resolved"]
    assert notifier.sent[-1]["status"] == "resolved" and changes[-1] == "resolved"
    assert manager.alerts() == [] and manager.alerts(include_resolved=True) == [alert]


async def test_data_back_and_still_bad_fires_again() -> None:
    notifier = RecordingNotifier()
    manager = AlertManager(notifier)
    await manager.evaluate([SLOW], SLOW_FIGURES, now=0.0)
    await manager.evaluate([SLOW], QUIET_FIGURES, now=10.0)
    await manager.evaluate([SLOW], SLOW_FIGURES, now=20.0)
    (alert,) = manager.alerts()
    assert alert.state is AlertState.FIRING and alert.no_data_at is None
    assert "state" not in alert.annotations and alert.fired_at == 0.0
    assert notifier.states() == ["firing", "no_data", "firing"]


async def test_keep_firing_for_needs_false_evaluations_on_data_without_a_gap() -> None:
    notifier = RecordingNotifier()
    manager = AlertManager(notifier)
    rule = AlertRule("SlowP99", "latency_p99", 0.25, min_requests=100, keep_firing_for_s=30.0)
    await manager.evaluate([rule], SLOW_FIGURES, now=0.0)
    (alert,) = manager.alerts()
    await manager.evaluate([rule], FAST_FIGURES, now=10.0)
    await manager.evaluate([rule], FAST_FIGURES, now=30.0)
    assert alert.state is AlertState.FIRING  # false for 20 s only
    await manager.evaluate([rule], QUIET_FIGURES, now=35.0)  # a gap: the count starts again
    assert alert.state is AlertState.NO_DATA
    await manager.evaluate([rule], FAST_FIGURES, now=45.0)
    assert alert.state is AlertState.FIRING  # data back, not yet clear long enough
    await manager.evaluate([rule], SLOW_FIGURES, now=50.0)  # bad again: the count starts again
    await manager.evaluate([rule], FAST_FIGURES, now=55.0)
    await manager.evaluate([rule], FAST_FIGURES, now=84.0)
    assert alert.state is AlertState.FIRING
    await manager.evaluate([rule], FAST_FIGURES, now=85.0)
    assert alert.state is AlertState.RESOLVED and alert.resolved_at == 85.0
    assert notifier.states() == ["firing", "no_data", "firing", "resolved"]


async def test_a_pending_alert_without_data_is_forgotten_silently() -> None:
    notifier = RecordingNotifier()
    manager = AlertManager(notifier)
    rule = AlertRule("SlowP99", "latency_p99", 0.25, for_s=60.0, min_requests=100)
    await manager.evaluate([rule], SLOW_FIGURES, now=0.0)
    assert manager.alerts()[0].state is AlertState.PENDING
    await manager.evaluate([rule], QUIET_FIGURES, now=10.0)
    assert manager.alerts() == [] and notifier.sent == []
    # It starts over: `for` counts from the next time it holds.
    await manager.evaluate([rule], SLOW_FIGURES, now=20.0)
    await manager.evaluate([rule], SLOW_FIGURES, now=70.0)
    assert manager.alerts()[0].state is AlertState.PENDING
    await manager.evaluate([rule], SLOW_FIGURES, now=80.0)
    assert manager.alerts()[0].state is AlertState.FIRING


async def test_an_alias_moving_away_resolves_with_the_reason() -> None:
    notifier = RecordingNotifier()
    manager = AlertManager(notifier)
    rule = AlertRule("SlowP99", "latency_p99", 0.25, alias="production", min_requests=100)
    await manager.evaluate([rule], SLOW_FIGURES, now=0.0)
    (alert,) = manager.alerts()
    moved = {("m", 1): VersionStats(model="m", version=1, request_count=500, latency_p99_s=0.4)}
    await manager.evaluate([rule], moved, now=5.0)
    assert alert.state is AlertState.RESOLVED and "alias moved" in alert.annotations["resolution"]


async def test_drift_p_alerts_go_to_no_data_when_the_window_empties() -> None:
    notifier = RecordingNotifier()
    manager = AlertManager(notifier)
    (rule,) = parse_rules(
        "rules:\n  - {name: InputDrift, metric: input_drift_p, op: '<', threshold: 0.001,"
        " for: 10s, keep_firing_for: 1m}\n"
    ).rules
    assert rule.keep_firing_for_s == 60.0 and rule.op == "<"
    await manager.evaluate([rule], stats(input_drift_p=1e-9), now=0.0)
    await manager.evaluate([rule], stats(input_drift_p=1e-9), now=10.0)
    (alert,) = manager.alerts()
    assert alert.state is AlertState.FIRING
    await manager.evaluate([rule], stats(input_drift_p=math.nan), now=20.0)  # below min_items
    assert alert.state is AlertState.NO_DATA
    await manager.evaluate([rule], stats(input_drift_p=0.4), now=30.0)
    await manager.evaluate([rule], stats(input_drift_p=0.6), now=90.0)
    assert alert.state is AlertState.RESOLVED and alert.value == 0.6


@pytest.mark.parametrize("text", ["keep_firing_for: -1s", "keep_firing_for: soon"])
def test_a_bad_keep_firing_for_names_the_line(text: str) -> None:
    from monitor_service.rules import RuleFileError

    with pytest.raises(RuleFileError, match="<rules>:3: keep_firing_for"):
        parse_rules(f"rules:\n  - name: A\n    {text}\n    metric: error_rate\n    threshold: 1\n")
