"""Alert rule evaluation (pending → firing ⇄ no data → resolved) and delivery to the log and
webhooks.

Each rule is evaluated against every model version it selects after every scrape; one
(rule, model, version) is one alert instance. An instance whose condition holds is pending;
after the rule's `for` it fires. Each later evaluation finds the condition true, false, or
without data (the figure is NaN: too few requests or sampled items in the window, no
baseline; or the version is no longer in the figures at all):

- false, on data: the alert resolves (after the rule's `keep_firing_for`, if any: that long
  of false evaluations in a row);
- no data: a firing alert goes to **no data**, not resolved: data running out is not
  evidence of recovery. It stays there until an evaluation on data finds the condition true
  (firing again) or false (resolved, as above);
- a pending alert that does not hold, for either reason, is forgotten silently.

A version that the rule no longer selects (its alias moved to another version) ends its
alert as resolved, with the annotation `resolution` saying so.

State changes are delivered to the log, to the events channel, and to every webhook as an
Alertmanager webhook payload (version "4"), so anything that receives Alertmanager
notifications receives these. Alertmanager knows only "firing" and "resolved": a no-data
alert is sent as firing (it has not resolved), with the annotations `state: no_data` and
`no_data_since`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import math
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from monitor_service.collector import VersionStats
from monitor_service.rules import AlertRule

__all__ = ["Alert", "AlertManager", "AlertState", "WebhookNotifier", "alertmanager_payload", "rule_value"]

log = logging.getLogger(__name__)

_ZERO_TIME = "0001-01-01T00:00:00Z"


class AlertState(enum.Enum):
    PENDING = "pending"
    FIRING = "firing"
    NO_DATA = "no_data"
    """It fired, and its expression has had no data since: neither firing nor resolved."""
    RESOLVED = "resolved"


class _Outcome(enum.Enum):
    """What one evaluation found for one (rule, model, version)."""

    HOLDS = "holds"
    CLEAR = "clear"
    NO_DATA = "no_data"
    UNSELECTED = "unselected"


@dataclass
class Alert:
    """One alert instance."""

    name: str
    labels: dict[str, str]
    annotations: dict[str, str]
    value: float
    threshold: float
    state: AlertState
    active_at: float
    fired_at: float | None = None
    resolved_at: float | None = None
    ends_at: float | None = None
    """For one-shot alerts (canary rollbacks): when they resolve by themselves."""
    keep_firing_for_s: float = 0.0
    """From the rule: how long the condition must be false on data before it resolves."""
    no_data_at: float | None = None
    """Since when its expression has had no data (state NO_DATA)."""
    clear_since: float | None = None
    """Since when its condition has been false on data, evaluation after evaluation, while
    it is still firing (keep_firing_for)."""

    @property
    def active(self) -> bool:
        """Firing or without data: receivers hold it as firing."""
        return self.state in (AlertState.FIRING, AlertState.NO_DATA)

    @property
    def fingerprint(self) -> str:
        text = json.dumps(sorted(self.labels.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def rule_value(rule: AlertRule, stats: VersionStats) -> float:
    """The value a rule tests for one version (NaN: not enough data to judge)."""
    match rule.metric:
        case "error_rate":
            return stats.error_rate if stats.request_count >= rule.min_requests else math.nan
        case "latency_p50" | "latency_p95" | "latency_p99":
            if stats.request_count < rule.min_requests:
                return math.nan
            return float(getattr(stats, f"{rule.metric}_s"))
        case "requests_per_second":
            return stats.requests_per_second
        case "queue_depth":
            return stats.queue_depth
        case "no_ready_replica":
            return 1.0 if stats.aliases and stats.replicas_ready == 0 else 0.0
        case "input_drift":
            return stats.input_drift
        case "input_psi":
            return stats.input_psi
        case "input_drift_p":
            return stats.input_drift_p
    raise ValueError(f"unknown metric {rule.metric!r}")


def _rfc3339(seconds: float | None) -> str:
    if seconds is None:
        return _ZERO_TIME
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alertmanager_payload(alerts: Sequence[Alert], *, receiver: str, external_url: str = "") -> dict[str, Any]:
    """The Alertmanager webhook body (version "4") for alerts of one group (one alertname)."""
    status = "firing" if any(a.active for a in alerts) else "resolved"
    common_labels = dict(alerts[0].labels)
    for alert in alerts[1:]:
        common_labels = {k: v for k, v in common_labels.items() if alert.labels.get(k) == v}
    common_annotations = dict(alerts[0].annotations)
    for alert in alerts[1:]:
        common_annotations = {k: v for k, v in common_annotations.items() if alert.annotations.get(k) == v}
    group_labels = {"alertname": alerts[0].name}
    return {
        "version": "4",
        "groupKey": "{}:" + json.dumps(group_labels, sort_keys=True),
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common_labels,
        "commonAnnotations": common_annotations,
        "externalURL": external_url,
        "alerts": [
            {
                "status": "firing" if a.active else "resolved",
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": _rfc3339(a.fired_at or a.active_at),
                "endsAt": _rfc3339(a.resolved_at if a.state is AlertState.RESOLVED else a.ends_at),
                "generatorURL": external_url,
                "fingerprint": a.fingerprint,
            }
            for a in alerts
        ],
    }


class WebhookNotifier:
    """POSTs Alertmanager payloads to every URL, each in its own task, retrying a few times.

    Args:
        urls: The webhook URLs.
        receiver: The `receiver` field of the payload.
        attempts: Tries per delivery (1 s apart).
    """

    def __init__(self, urls: Sequence[str], *, receiver: str = "modelyard", attempts: int = 3) -> None:
        self._urls = list(urls)
        self._receiver = receiver
        self._attempts = attempts
        self._pending: set[asyncio.Task[None]] = set()
        self.delivered = 0

    def notify(self, alerts: Sequence[Alert]) -> None:
        if not self._urls or not alerts:
            return
        body = json.dumps(alertmanager_payload(alerts, receiver=self._receiver)).encode()
        for url in self._urls:
            task = asyncio.create_task(self._deliver(url, body), name=f"webhook {url}")
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _deliver(self, url: str, body: bytes) -> None:
        def post() -> None:
            request = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=5.0) as response:
                response.read()

        for attempt in range(1, self._attempts + 1):
            try:
                await asyncio.to_thread(post)
                self.delivered += 1
                return
            except OSError as exc:
                log.warning("webhook %s failed (attempt %d/%d): %s", url, attempt, self._attempts, exc)
                if attempt < self._attempts:
                    await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        """Wait (briefly) for deliveries in flight, so a resolution is not lost at shutdown."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=5.0)
        for task in list(self._pending):
            task.cancel()


Sink = Callable[[Alert], Awaitable[None]]


@dataclass
class AlertManager:
    """Holds every alert instance and moves it through its cycle.

    Args:
        notifier: Webhook delivery.
        on_change: Called on every change of state after pending: firing, no data, firing
            again, resolved (the monitor publishes an event).
        keep_resolved: How many resolved alerts `alerts(include_resolved=True)` remembers.
    """

    notifier: WebhookNotifier
    on_change: Sink | None = None
    keep_resolved: int = 200
    _active: dict[tuple[str, str, int], Alert] = field(default_factory=dict)
    _resolved: deque[Alert] = field(default_factory=deque)

    async def evaluate(
        self, rules: Sequence[AlertRule], stats: dict[tuple[str, int], VersionStats], now: float
    ) -> None:
        """One evaluation of every rule against every version's figures."""
        outcomes: dict[tuple[str, str, int], tuple[_Outcome, float]] = {}
        changed: list[Alert] = []
        for rule in rules:
            for (model, version), figures in stats.items():
                key = (rule.name, model, version)
                if rule.model not in ("*", model) or (rule.alias and rule.alias not in figures.aliases):
                    outcomes.setdefault(key, (_Outcome.UNSELECTED, math.nan))
                    continue
                value = rule_value(rule, figures)
                if rule.matches(value):
                    outcomes[key] = (_Outcome.HOLDS, value)
                    if key not in self._active:
                        self._active[key] = self._new_alert(rule, model, version, value, now)
                else:
                    outcomes[key] = (_Outcome.NO_DATA if math.isnan(value) else _Outcome.CLEAR, value)
                alert = self._active.get(key)
                if alert is not None and outcomes[key][0] is _Outcome.HOLDS:
                    alert.keep_firing_for_s = rule.keep_firing_for_s
                    if alert.state is AlertState.PENDING and now - alert.active_at >= rule.for_s:
                        alert.state = AlertState.FIRING
                        alert.fired_at = now
                        changed.append(alert)
        for key, alert in list(self._active.items()):
            if alert.ends_at is not None:
                if alert.ends_at <= now:
                    self._end(key, alert, now, changed)
                continue
            # A version missing from the figures altogether has no data either.
            outcome, value = outcomes.get(key, (_Outcome.NO_DATA, math.nan))
            if self._step(alert, outcome, value, now):
                if alert.state is AlertState.RESOLVED:
                    self._end(key, alert, now, changed)
                elif alert.state is AlertState.PENDING:
                    del self._active[key]  # a pending alert that does not hold is forgotten
                else:
                    changed.append(alert)
        for alert in changed:
            await self._deliver(alert)

    @staticmethod
    def _new_alert(rule: AlertRule, model: str, version: int, value: float, now: float) -> Alert:
        labels = {
            "alertname": rule.name,
            "severity": rule.severity,
            "model": model,
            "version": str(version),
            **rule.labels,
        }
        annotations = {
            "summary": f"{rule.metric} {rule.op} {rule.threshold:g} on {model} v{version}",
            **rule.annotations,
        }
        return Alert(
            rule.name,
            labels,
            annotations,
            value,
            rule.threshold,
            AlertState.PENDING,
            now,
            keep_firing_for_s=rule.keep_firing_for_s,
        )

    @staticmethod
    def _step(alert: Alert, outcome: _Outcome, value: float, now: float) -> bool:
        """Move one alert by one evaluation's outcome; whether its state changed (or, for a
        pending alert, whether it is to be forgotten)."""
        if outcome is not _Outcome.NO_DATA and outcome is not _Outcome.UNSELECTED:
            alert.value = value
            alert.annotations["value"] = f"{value:.6g}"
        if alert.state is AlertState.PENDING:
            return outcome is not _Outcome.HOLDS
        if outcome is _Outcome.HOLDS:
            alert.clear_since = None
            if alert.state is AlertState.NO_DATA:
                alert.state = AlertState.FIRING
                alert.no_data_at = None
                alert.annotations.pop("state", None)
                alert.annotations.pop("no_data_since", None)
                return True
            return False
        if outcome is _Outcome.UNSELECTED:
            alert.state = AlertState.RESOLVED
            alert.annotations["resolution"] = "the rule no longer selects this version (its alias moved)"
            return True
        if outcome is _Outcome.NO_DATA:
            alert.clear_since = None  # recovery must be seen without a gap
            if alert.state is AlertState.NO_DATA:
                return False
            alert.state = AlertState.NO_DATA
            alert.no_data_at = now
            alert.annotations["state"] = "no_data"
            alert.annotations["no_data_since"] = _rfc3339(now)
            return True
        # CLEAR: false, on data.
        if alert.clear_since is None:
            alert.clear_since = now
        if now - alert.clear_since >= alert.keep_firing_for_s:
            alert.state = AlertState.RESOLVED
            alert.annotations.pop("state", None)
            alert.annotations.pop("no_data_since", None)
            return True
        if alert.state is AlertState.NO_DATA:  # data is back; not yet clear for long enough
            alert.state = AlertState.FIRING
            alert.no_data_at = None
            alert.annotations.pop("state", None)
            alert.annotations.pop("no_data_since", None)
            return True
        return False

    def _end(self, key: tuple[str, str, int], alert: Alert, now: float, changed: list[Alert]) -> None:
        del self._active[key]
        alert.state = AlertState.RESOLVED
        alert.resolved_at = now
        self._remember(alert)
        changed.append(alert)

    async def fire_once(
        self,
        name: str,
        labels: dict[str, str],
        annotations: dict[str, str],
        value: float,
        threshold: float,
        now: float,
        hold_s: float,
    ) -> Alert:
        """Fire an alert at once that resolves by itself after `hold_s` (an event, such as a
        canary rollback, rather than a condition)."""
        alert = Alert(
            name,
            {"alertname": name, **labels},
            annotations,
            value,
            threshold,
            AlertState.FIRING,
            now,
            fired_at=now,
            ends_at=now + hold_s,
        )
        self._active[(name, labels.get("model", ""), int(labels.get("version", "0") or 0))] = alert
        await self._deliver(alert)
        return alert

    def alerts(self, *, include_resolved: bool = False) -> list[Alert]:
        """Active alerts (and recently resolved ones), newest first."""
        out = list(self._active.values()) + (list(self._resolved) if include_resolved else [])
        return sorted(out, key=lambda a: a.resolved_at or a.fired_at or a.active_at, reverse=True)

    def _remember(self, alert: Alert) -> None:
        self._resolved.append(alert)
        while len(self._resolved) > self.keep_resolved:
            self._resolved.popleft()

    async def _deliver(self, alert: Alert) -> None:
        level = logging.WARNING if alert.active else logging.INFO
        log.log(
            level,
            "alert %s %s: %s (value %.6g, threshold %g)",
            alert.name,
            alert.state.value,
            ", ".join(f"{k}={v}" for k, v in sorted(alert.labels.items())),
            alert.value,
            alert.threshold,
        )
        self.notifier.notify([alert])
        if self.on_change is not None:
            await self.on_change(alert)
