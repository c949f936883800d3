"""The monitor's gRPC adapter for modelyard.v1.MonitorService."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, timestamp_pb2

from modelyard.rpc.errors import rpc_errors
from modelyard.v1 import model_server_service_pb2 as ms_pb
from modelyard.v1 import monitor_service_pb2 as pb
from modelyard.v1 import monitor_service_pb2_grpc as pb_grpc
from modelyard.v1 import tensor_pb2
from monitor_service.alerting import Alert, AlertManager, AlertState
from monitor_service.canary import CanaryAction, CanaryDecision, CanaryFigures
from monitor_service.cluster import ClusterView
from monitor_service.collector import ProcessFigures, VersionStats
from monitor_service.events import EventBus

__all__ = ["MonitorServicer"]

_KINDS = {
    "gateway": pb.SERVICE_KIND_GATEWAY,
    "model_server": pb.SERVICE_KIND_MODEL_SERVER,
    "registry": pb.SERVICE_KIND_REGISTRY,
    "monitor": pb.SERVICE_KIND_MONITOR,
}
_STATES = {
    "up": pb.SERVICE_STATE_UP,
    "degraded": pb.SERVICE_STATE_DEGRADED,
    "down": pb.SERVICE_STATE_DOWN,
}
_VERSION_STATES = {
    "loading": ms_pb.VERSION_STATE_LOADING,
    "ready": ms_pb.VERSION_STATE_READY,
    "unloading": ms_pb.VERSION_STATE_UNLOADING,
    "failed": ms_pb.VERSION_STATE_FAILED,
}


_ALERT_STATES = {
    AlertState.PENDING: pb.ALERT_STATE_PENDING,
    AlertState.FIRING: pb.ALERT_STATE_FIRING,
    AlertState.NO_DATA: pb.ALERT_STATE_NO_DATA,
    AlertState.RESOLVED: pb.ALERT_STATE_RESOLVED,
}
_CANARY_ACTIONS = {
    CanaryAction.HEALTHY: pb.CANARY_ACTION_HEALTHY,
    CanaryAction.ROLLBACK: pb.CANARY_ACTION_ROLLBACK,
    CanaryAction.PROMOTE: pb.CANARY_ACTION_PROMOTE,
    CanaryAction.STEP: pb.CANARY_ACTION_STEP,
    CanaryAction.START: pb.CANARY_ACTION_START,
    CanaryAction.END: pb.CANARY_ACTION_END,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _duration(seconds: float) -> duration_pb2.Duration | None:
    """A Duration, or None (field left unset) when the figure is unknown."""
    if math.isnan(seconds):
        return None
    nanos = int(seconds * 1e9)
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _known(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _version_stats(stats: VersionStats) -> pb.VersionStats:
    return pb.VersionStats(
        model=stats.model,
        version=stats.version,
        aliases=stats.aliases,
        request_count=int(stats.request_count),
        requests_per_second=stats.requests_per_second,
        error_rate=stats.error_rate,
        requests_by_code={code: int(n) for code, n in stats.requests_by_code.items()},
        latency_p50=_duration(stats.latency_p50_s),
        latency_p95=_duration(stats.latency_p95_s),
        latency_p99=_duration(stats.latency_p99_s),
        queue_time_mean=_duration(stats.queue_time_mean_s),
        compute_time_mean=_duration(stats.compute_time_mean_s),
        batch_size_mean=0.0 if math.isnan(stats.batch_size_mean) else stats.batch_size_mean,
        batch_sizes=[pb.HistogramBucket(upper_bound=b, count=int(n)) for b, n in stats.batch_sizes],
        queue_depth=stats.queue_depth,
        replicas_ready=stats.replicas_ready,
        # NaN inside the monitor (no data) is 0 on the wire for these two, as it always was;
        # the p-value is left unset instead (0 would read "certainly drifted").
        input_drift=_known(stats.input_drift),
        input_psi=_known(stats.input_psi),
        input_drift_p=None if math.isnan(stats.input_drift_p) else stats.input_drift_p,
        requests_per_second_by_alias=stats.requests_per_second_by_alias,
        shadow=_shadow_stats(stats),
    )


def _shadow_stats(stats: VersionStats) -> pb.ShadowStats | None:
    """The shadow figures, or None (field unset) for a version nothing was mirrored to."""
    if not stats.shadowed:
        return None
    return pb.ShadowStats(
        comparisons=int(stats.shadow_comparisons),
        mismatches=int(stats.shadow_mismatches),
        errors=int(stats.shadow_errors),
        mismatch_rate=stats.shadow_mismatch_rate,
        max_abs_diff=None if math.isnan(stats.shadow_max_abs_diff) else stats.shadow_max_abs_diff,
    )


def _process_stats(figures: ProcessFigures) -> pb.ProcessStats:
    return pb.ProcessStats(
        service_ids=figures.service_ids,
        cpu_usage=figures.cpu_usage,
        resident_memory_bytes=int(figures.resident_memory_bytes),
        gpu_memory_bytes=int(figures.gpu_memory_bytes),
        gpu_memory_reserved_bytes=int(figures.gpu_memory_reserved_bytes),
    )


def _alert(alert: Alert) -> pb.Alert:
    return pb.Alert(
        name=alert.name,
        state=_ALERT_STATES[alert.state],
        labels=alert.labels,
        annotations=alert.annotations,
        value=0.0 if math.isnan(alert.value) else alert.value,
        threshold=alert.threshold,
        active_time=_timestamp(alert.active_at),
        fire_time=_timestamp(alert.fired_at) if alert.fired_at is not None else None,
        resolve_time=_timestamp(alert.resolved_at) if alert.resolved_at is not None else None,
        no_data_time=_timestamp(alert.no_data_at) if alert.no_data_at is not None else None,
    )


def _figures(figures: CanaryFigures) -> pb.CanaryFigures:
    return pb.CanaryFigures(
        version=figures.version,
        request_count=figures.request_count,
        error_rate=figures.error_rate,
        latency_p99=_duration(figures.latency_p99_s),
    )


def _decision(decision: CanaryDecision) -> pb.CanaryDecision:
    return pb.CanaryDecision(
        model=decision.model,
        action=_CANARY_ACTIONS[decision.action],
        reason=decision.reason,
        canary=_figures(decision.canary),
        stable=_figures(decision.stable),
        decide_time=_timestamp(decision.time),
        traffic_fraction=decision.traffic_fraction,
    )


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    """Thin adapter over the monitor's parts; it depends on them, never on the app.

    Args:
        cluster: The services in the cluster and their state.
        stats: The latest figures per (model, version) (replaced each collection round).
        processes: The latest figures per service process.
        alerts: The alerts, firing and resolved.
        decisions: The canary decisions, newest first.
        events: The change events to watch.
        window_s: The window the figures cover.
        metrics_scheme: The scheme reported for services whose record names none (older
            services): the one the monitor scrapes them with.
    """

    def __init__(
        self,
        *,
        cluster: ClusterView,
        stats: Callable[[], Mapping[tuple[str, int], VersionStats]],
        processes: Callable[[], Sequence[ProcessFigures]],
        alerts: AlertManager,
        decisions: Callable[[], Sequence[CanaryDecision]],
        events: EventBus,
        window_s: float,
        metrics_scheme: str = "http",
    ) -> None:
        self._cluster = cluster
        self._metrics_scheme = metrics_scheme
        self._stats = stats
        self._processes = processes
        self._alerts = alerts
        self._decisions = decisions
        self._events = events
        self._window_s = window_s

    @rpc_errors
    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetClusterStatusResponse:
        services = []
        for view in await self._cluster.services():
            record = view.record
            loaded = [
                ms_pb.LoadedVersion(
                    model=v.model,
                    version=v.version,
                    state=_VERSION_STATES.get(v.state, ms_pb.VERSION_STATE_UNSPECIFIED),
                    error=v.error,
                    signature=json_format.ParseDict(v.signature, tensor_pb2.Signature()),
                    device=v.device,
                    outstanding_requests=v.outstanding,
                )
                for v in record.versions
            ]
            services.append(
                pb.ServiceStatus(
                    id=record.id,
                    kind=_KINDS.get(record.kind, pb.SERVICE_KIND_UNSPECIFIED),
                    address=record.address,
                    state=_STATES[view.state],
                    software_version=record.software_version,
                    start_time=_timestamp(record.start_time),
                    heartbeat_time=_timestamp(record.heartbeat_time),
                    loaded_versions=loaded,
                    metrics_address=record.metrics_address,
                    metrics_scheme=(record.metrics_scheme or self._metrics_scheme)
                    if record.metrics_address
                    else "",
                )
            )
        return pb.GetClusterStatusResponse(services=services)

    @rpc_errors
    async def GetModelStats(
        self, request: pb.GetModelStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelStatsResponse:
        versions = [
            _version_stats(stats)
            for (model, _version), stats in sorted(self._stats().items())
            if not request.model or model == request.model
        ]
        processes = [_process_stats(p) for p in self._processes()]
        return pb.GetModelStatsResponse(
            window=_duration(self._window_s), versions=versions, processes=processes
        )

    @rpc_errors
    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAlertsResponse:
        alerts = self._alerts.alerts(include_resolved=request.include_resolved)
        return pb.ListAlertsResponse(alerts=[_alert(a) for a in alerts])

    @rpc_errors
    async def ListCanaryDecisions(
        self, request: pb.ListCanaryDecisionsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListCanaryDecisionsResponse:
        decisions = self._decisions()
        return pb.ListCanaryDecisionsResponse(
            decisions=[_decision(d) for d in decisions if not request.model or d.model == request.model]
        )

    @rpc_errors
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        async for event in self._events.watch(request.model):
            yield pb.WatchEventsResponse(
                event_time=_timestamp(event.time),
                type=event.type,
                model=event.model,
                summary=event.summary,
                payload_json=json.dumps(event.payload),
            )
