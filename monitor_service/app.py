"""The monitor's composition root: collection loop, rules, drift, canary analysis, gRPC."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from modelyard import __version__
from modelyard.access import AccessControl
from modelyard.access.sync import KeySync
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.errors import Unavailable
from modelyard.membership import Heartbeat, new_service_id
from modelyard.rpc.server import ServiceServer, create_server
from modelyard.tasks import BackgroundTasks
from modelyard.tls import ClientTLS
from modelyard.v1 import monitor_service_pb2_grpc
from modelyard.v1 import registry_service_pb2 as reg
from monitor_service.alerting import Alert, AlertManager, AlertState, WebhookNotifier
from monitor_service.canary import CanaryAction, CanaryAnalyzer, CanaryDecision
from monitor_service.cluster import ClusterView
from monitor_service.collector import Collector, VersionStats, metrics_fetcher
from monitor_service.drift import DriftDetector
from monitor_service.events import EventBus
from monitor_service.metrics import (
    ALERTS_FIRING,
    ALERTS_NO_DATA,
    CANARY_DECISIONS,
    INPUT_DRIFT,
    INPUT_DRIFT_P,
    INPUT_PSI,
    SCRAPE_SECONDS,
    SCRAPES,
)
from monitor_service.registry_client import RegistryClient
from monitor_service.rules import RuleFile, load_rule_file
from monitor_service.servicer import MonitorServicer
from monitor_service.settings import MonitorSettings
from monitor_service.shadow import ShadowWatch

__all__ = ["MonitorApp"]

log = logging.getLogger(__name__)

SERVICE_NAME = "modelyard.v1.MonitorService"


def _known(value: float) -> float:
    return 0.0 if math.isnan(value) else value


class MonitorApp:
    """A monitor process: `await start()`, serve, `await aclose()`.

    Raises:
        RuleFileError: from the constructor, when the rule file is bad (with the line).
    """

    name = "monitor"

    def __init__(self, settings: MonitorSettings) -> None:
        self.settings = settings
        self.rule_file = load_rule_file(settings.rules_file) if settings.rules_file else RuleFile()
        self.service_id = settings.service_id or new_service_id("monitor")
        self.store = CoordinationStore(settings.redis)
        self.access = AccessControl(settings.access, kind="monitor")
        self.key_sync = KeySync(
            self.store, self.access.book, interval_s=settings.access.key_refresh_interval_s
        )
        self.cluster = ClusterView(self.store, settings.down_retention_s)
        self.collector = Collector(
            self.store,
            settings.window_s,
            fetch=metrics_fetcher(ClientTLS.from_settings(settings.tls), self.access.service_token()),
        )
        self.drift = DriftDetector(
            self.rule_file.baselines,
            learn_items=settings.drift_learn_items,
            min_items=settings.drift_min_items,
        )
        self.events = EventBus(self.store)
        self.notifier = WebhookNotifier(settings.webhook_urls)
        self.alerts = AlertManager(self.notifier, on_change=self._alert_changed)
        self.registry = RegistryClient(
            lambda: self.collector.services,
            ClientTLS.from_settings(settings.tls),
            self.access.service_token(),
        )
        self.canary = CanaryAnalyzer(
            settings.canary,
            self.registry,
            self._canary_decided,
            window_s=settings.window_s,
            figures=self.collector.version_stats,
        )
        self.shadow_watch = ShadowWatch(settings.shadow_mismatch_threshold)
        self._baselines_fetched: set[tuple[str, int]] = set()
        self.stats: dict[tuple[str, int], VersionStats] = {}
        self.rounds = 0
        self._round_done = asyncio.Condition()
        self._tasks = BackgroundTasks(restart_delay_s=settings.scrape_interval_s)
        servicer = MonitorServicer(
            cluster=self.cluster,
            stats=lambda: self.stats,
            processes=self.collector.process_stats,
            alerts=self.alerts,
            decisions=lambda: self.canary.decisions,
            events=self.events,
            window_s=settings.window_s,
            metrics_scheme="https" if settings.tls.enabled else "http",
        )
        self.server: ServiceServer = create_server(
            settings.server,
            settings.tls,
            service_names=[SERVICE_NAME],
            kind="monitor",
            register=lambda s: monitor_service_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, s),
            access=self.access,
        )
        self.heartbeat = Heartbeat(
            self.store,
            lambda: ServiceRecord(
                id=self.service_id,
                kind="monitor",
                address=self.server.address,
                metrics_address=self.server.metrics_address,
                metrics_scheme=self.server.metrics_scheme,
                software_version=__version__,
                start_time=self.heartbeat.start_time,
            ),
            interval_s=settings.server.heartbeat_interval_s,
            ttl_s=settings.server.heartbeat_ttl_s,
        )
        self._closed = False

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    async def start(self) -> None:
        await self.store.open()
        if self.access.enforced:
            await self.key_sync.refresh()
            self._tasks.spawn("key-sync", self.key_sync.run_forever)
        await self.server.start()
        await self.heartbeat.start()
        self._tasks.spawn("monitor collection", self._collect_forever)
        await self.server.set_serving(True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.server.health.enter_graceful_shutdown()
        await self._tasks.aclose()
        await self.heartbeat.aclose()
        await self.server.drain()
        await self.notifier.aclose()
        await self.registry.aclose()
        await self.store.aclose()

    async def wait_rounds(self, count: int = 1) -> None:
        """Wait until `count` more collection rounds have completed (for tests and tools)."""
        target = self.rounds + count
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= target)

    async def _collect_forever(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                await self.collect_once()
            except Unavailable as exc:
                log.warning("collection round skipped: %s", exc)
            SCRAPE_SECONDS.observe(time.perf_counter() - started)
            await asyncio.sleep(self.settings.scrape_interval_s)

    async def collect_once(self) -> None:
        """One round: scrape, compute the figures, evaluate drift, rules and canaries."""
        await self.collector.scrape()
        SCRAPES.inc()
        now = time.time()
        stats = self.collector.version_stats()
        await self._fetch_baselines([key for key, figures in stats.items() if figures.inputs])
        self.drift.apply(stats)
        for (model, version), figures in stats.items():
            if figures.inputs:
                # 0 when unknown, as these two always were; the p-value is NaN then.
                INPUT_DRIFT.labels(model, str(version)).set(_known(figures.input_drift))
                INPUT_PSI.labels(model, str(version)).set(_known(figures.input_psi))
                INPUT_DRIFT_P.labels(model, str(version)).set(figures.input_drift_p)
        self.events.observe_membership(self.collector.services)
        await self.alerts.evaluate(self.rule_file.rules, stats, now)
        await self.canary.evaluate(stats, self.collector.routing, now)
        for event in self.shadow_watch.observe(stats):
            await self.events.publish(event)
        active = self.alerts.alerts()
        ALERTS_FIRING.set(sum(a.state is AlertState.FIRING for a in active))
        ALERTS_NO_DATA.set(sum(a.state is AlertState.NO_DATA for a in active))
        self.stats = stats
        async with self._round_done:
            self.rounds += 1
            self._round_done.notify_all()

    async def _alert_changed(self, alert: Alert) -> None:
        await self.events.publish(
            {
                "type": "alert",
                "model": alert.labels.get("model", ""),
                "name": alert.name,
                "state": alert.state.value,
                "labels": alert.labels,
                "summary": alert.annotations.get("summary", ""),
                "value": alert.value,
                "threshold": alert.threshold,
                **({"no_data_since": alert.no_data_at} if alert.no_data_at is not None else {}),
            }
        )

    async def _canary_decided(self, decision: CanaryDecision) -> None:
        CANARY_DECISIONS.labels(decision.action.value).inc()
        await self.events.publish(decision.as_event())
        if decision.action is CanaryAction.ROLLBACK:
            await self.alerts.fire_once(
                "CanaryRolledBack",
                {"severity": "critical", "model": decision.model, "version": str(decision.canary.version)},
                {
                    "summary": f"canary v{decision.canary.version} of {decision.model} rolled back "
                    f"to v{decision.stable.version}",
                    "description": f"{decision.reason} [canary {decision.canary.describe()} | "
                    f"stable {decision.stable.describe()}]",
                },
                decision.canary.error_rate,
                self.settings.canary.max_error_rate_increase,
                decision.time,
                self.settings.event_alert_hold_s,
            )

    async def _fetch_baselines(self, keys: list[tuple[str, int]]) -> None:
        """Ask the registry for the input baseline of every version not asked about yet.

        A version's baseline never changes, so each is fetched once (a version without one is
        remembered too); a failed fetch is tried again next round.
        """
        wanted = [key for key in keys if key not in self._baselines_fetched]
        if not wanted:
            return
        try:
            stub = self.registry.stub()
        except Unavailable:
            return

        async def fetch(model: str, version: int) -> None:
            try:
                response = await stub.GetModelVersion(
                    reg.GetModelVersionRequest(model=model, version=version), timeout=5.0
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                    self._baselines_fetched.add((model, version))  # nothing to compare with
                else:
                    log.warning("cannot fetch the baseline of %s v%d: %s", model, version, exc.details())
                return
            self.drift.set_registry_baselines(model, version, list(response.model_version.input_baselines))
            self._baselines_fetched.add((model, version))

        await asyncio.gather(*(fetch(model, version) for model, version in wanted))
