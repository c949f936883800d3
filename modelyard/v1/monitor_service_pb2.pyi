import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from modelyard.v1 import model_server_service_pb2 as _model_server_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServiceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_KIND_UNSPECIFIED: _ClassVar[ServiceKind]
    SERVICE_KIND_GATEWAY: _ClassVar[ServiceKind]
    SERVICE_KIND_MODEL_SERVER: _ClassVar[ServiceKind]
    SERVICE_KIND_REGISTRY: _ClassVar[ServiceKind]
    SERVICE_KIND_MONITOR: _ClassVar[ServiceKind]

class ServiceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVICE_STATE_UNSPECIFIED: _ClassVar[ServiceState]
    SERVICE_STATE_UP: _ClassVar[ServiceState]
    SERVICE_STATE_DEGRADED: _ClassVar[ServiceState]
    SERVICE_STATE_DOWN: _ClassVar[ServiceState]

class AlertState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_STATE_UNSPECIFIED: _ClassVar[AlertState]
    ALERT_STATE_PENDING: _ClassVar[AlertState]
    ALERT_STATE_FIRING: _ClassVar[AlertState]
    ALERT_STATE_RESOLVED: _ClassVar[AlertState]
    ALERT_STATE_NO_DATA: _ClassVar[AlertState]

class CanaryAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANARY_ACTION_UNSPECIFIED: _ClassVar[CanaryAction]
    CANARY_ACTION_HEALTHY: _ClassVar[CanaryAction]
    CANARY_ACTION_ROLLBACK: _ClassVar[CanaryAction]
    CANARY_ACTION_PROMOTE: _ClassVar[CanaryAction]
    CANARY_ACTION_STEP: _ClassVar[CanaryAction]
    CANARY_ACTION_START: _ClassVar[CanaryAction]
    CANARY_ACTION_END: _ClassVar[CanaryAction]
SERVICE_KIND_UNSPECIFIED: ServiceKind
SERVICE_KIND_GATEWAY: ServiceKind
SERVICE_KIND_MODEL_SERVER: ServiceKind
SERVICE_KIND_REGISTRY: ServiceKind
SERVICE_KIND_MONITOR: ServiceKind
SERVICE_STATE_UNSPECIFIED: ServiceState
SERVICE_STATE_UP: ServiceState
SERVICE_STATE_DEGRADED: ServiceState
SERVICE_STATE_DOWN: ServiceState
ALERT_STATE_UNSPECIFIED: AlertState
ALERT_STATE_PENDING: AlertState
ALERT_STATE_FIRING: AlertState
ALERT_STATE_RESOLVED: AlertState
ALERT_STATE_NO_DATA: AlertState
CANARY_ACTION_UNSPECIFIED: CanaryAction
CANARY_ACTION_HEALTHY: CanaryAction
CANARY_ACTION_ROLLBACK: CanaryAction
CANARY_ACTION_PROMOTE: CanaryAction
CANARY_ACTION_STEP: CanaryAction
CANARY_ACTION_START: CanaryAction
CANARY_ACTION_END: CanaryAction

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("id", "kind", "address", "state", "software_version", "start_time", "heartbeat_time", "loaded_versions", "metrics_address", "metrics_scheme")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_SCHEME_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: ServiceKind
    address: str
    state: ServiceState
    software_version: str
    start_time: _timestamp_pb2.Timestamp
    heartbeat_time: _timestamp_pb2.Timestamp
    loaded_versions: _containers.RepeatedCompositeFieldContainer[_model_server_service_pb2.LoadedVersion]
    metrics_address: str
    metrics_scheme: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[ServiceKind, str]] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ServiceState, str]] = ..., software_version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loaded_versions: _Optional[_Iterable[_Union[_model_server_service_pb2.LoadedVersion, _Mapping]]] = ..., metrics_address: _Optional[str] = ..., metrics_scheme: _Optional[str] = ...) -> None: ...

class GetModelStatsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelStatsResponse(_message.Message):
    __slots__ = ("window", "versions", "processes")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    window: _duration_pb2.Duration
    versions: _containers.RepeatedCompositeFieldContainer[VersionStats]
    processes: _containers.RepeatedCompositeFieldContainer[ProcessStats]
    def __init__(self, window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., versions: _Optional[_Iterable[_Union[VersionStats, _Mapping]]] = ..., processes: _Optional[_Iterable[_Union[ProcessStats, _Mapping]]] = ...) -> None: ...

class VersionStats(_message.Message):
    __slots__ = ("model", "version", "aliases", "request_count", "requests_per_second", "error_rate", "requests_by_code", "latency_p50", "latency_p95", "latency_p99", "queue_time_mean", "compute_time_mean", "batch_size_mean", "batch_sizes", "queue_depth", "replicas_ready", "input_drift", "requests_per_second_by_alias", "input_psi", "input_drift_p", "shadow")
    class RequestsByCodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RequestsPerSecondByAliasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_BY_CODE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P95_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_MEAN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_TIME_MEAN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_MEAN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_READY_FIELD_NUMBER: _ClassVar[int]
    INPUT_DRIFT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_SECOND_BY_ALIAS_FIELD_NUMBER: _ClassVar[int]
    INPUT_PSI_FIELD_NUMBER: _ClassVar[int]
    INPUT_DRIFT_P_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    aliases: _containers.RepeatedScalarFieldContainer[str]
    request_count: int
    requests_per_second: float
    error_rate: float
    requests_by_code: _containers.ScalarMap[str, int]
    latency_p50: _duration_pb2.Duration
    latency_p95: _duration_pb2.Duration
    latency_p99: _duration_pb2.Duration
    queue_time_mean: _duration_pb2.Duration
    compute_time_mean: _duration_pb2.Duration
    batch_size_mean: float
    batch_sizes: _containers.RepeatedCompositeFieldContainer[HistogramBucket]
    queue_depth: float
    replicas_ready: int
    input_drift: float
    requests_per_second_by_alias: _containers.ScalarMap[str, float]
    input_psi: float
    input_drift_p: float
    shadow: ShadowStats
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., aliases: _Optional[_Iterable[str]] = ..., request_count: _Optional[int] = ..., requests_per_second: _Optional[float] = ..., error_rate: _Optional[float] = ..., requests_by_code: _Optional[_Mapping[str, int]] = ..., latency_p50: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., latency_p95: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., latency_p99: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., queue_time_mean: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., compute_time_mean: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., batch_size_mean: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[_Union[HistogramBucket, _Mapping]]] = ..., queue_depth: _Optional[float] = ..., replicas_ready: _Optional[int] = ..., input_drift: _Optional[float] = ..., requests_per_second_by_alias: _Optional[_Mapping[str, float]] = ..., input_psi: _Optional[float] = ..., input_drift_p: _Optional[float] = ..., shadow: _Optional[_Union[ShadowStats, _Mapping]] = ...) -> None: ...

class ShadowStats(_message.Message):
    __slots__ = ("comparisons", "mismatches", "errors", "mismatch_rate", "max_abs_diff")
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_DIFF_FIELD_NUMBER: _ClassVar[int]
    comparisons: int
    mismatches: int
    errors: int
    mismatch_rate: float
    max_abs_diff: float
    def __init__(self, comparisons: _Optional[int] = ..., mismatches: _Optional[int] = ..., errors: _Optional[int] = ..., mismatch_rate: _Optional[float] = ..., max_abs_diff: _Optional[float] = ...) -> None: ...

class HistogramBucket(_message.Message):
    __slots__ = ("upper_bound", "count")
    UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    upper_bound: float
    count: int
    def __init__(self, upper_bound: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class ProcessStats(_message.Message):
    __slots__ = ("service_ids", "cpu_usage", "resident_memory_bytes", "gpu_memory_bytes", "gpu_memory_reserved_bytes")
    SERVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    service_ids: _containers.RepeatedScalarFieldContainer[str]
    cpu_usage: float
    resident_memory_bytes: int
    gpu_memory_bytes: int
    gpu_memory_reserved_bytes: int
    def __init__(self, service_ids: _Optional[_Iterable[str]] = ..., cpu_usage: _Optional[float] = ..., resident_memory_bytes: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., gpu_memory_reserved_bytes: _Optional[int] = ...) -> None: ...

class ListAlertsRequest(_message.Message):
    __slots__ = ("include_resolved",)
    INCLUDE_RESOLVED_FIELD_NUMBER: _ClassVar[int]
    include_resolved: bool
    def __init__(self, include_resolved: _Optional[bool] = ...) -> None: ...

class ListAlertsResponse(_message.Message):
    __slots__ = ("alerts",)
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    alerts: _containers.RepeatedCompositeFieldContainer[Alert]
    def __init__(self, alerts: _Optional[_Iterable[_Union[Alert, _Mapping]]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("name", "state", "labels", "annotations", "value", "threshold", "active_time", "fire_time", "resolve_time", "no_data_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TIME_FIELD_NUMBER: _ClassVar[int]
    FIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESOLVE_TIME_FIELD_NUMBER: _ClassVar[int]
    NO_DATA_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: AlertState
    labels: _containers.ScalarMap[str, str]
    annotations: _containers.ScalarMap[str, str]
    value: float
    threshold: float
    active_time: _timestamp_pb2.Timestamp
    fire_time: _timestamp_pb2.Timestamp
    resolve_time: _timestamp_pb2.Timestamp
    no_data_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[AlertState, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., annotations: _Optional[_Mapping[str, str]] = ..., value: _Optional[float] = ..., threshold: _Optional[float] = ..., active_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resolve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., no_data_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CanaryFigures(_message.Message):
    __slots__ = ("version", "request_count", "error_rate", "latency_p99")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_FIELD_NUMBER: _ClassVar[int]
    version: int
    request_count: int
    error_rate: float
    latency_p99: _duration_pb2.Duration
    def __init__(self, version: _Optional[int] = ..., request_count: _Optional[int] = ..., error_rate: _Optional[float] = ..., latency_p99: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CanaryDecision(_message.Message):
    __slots__ = ("model", "action", "reason", "canary", "stable", "decide_time", "traffic_fraction")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    STABLE_FIELD_NUMBER: _ClassVar[int]
    DECIDE_TIME_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FRACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    action: CanaryAction
    reason: str
    canary: CanaryFigures
    stable: CanaryFigures
    decide_time: _timestamp_pb2.Timestamp
    traffic_fraction: float
    def __init__(self, model: _Optional[str] = ..., action: _Optional[_Union[CanaryAction, str]] = ..., reason: _Optional[str] = ..., canary: _Optional[_Union[CanaryFigures, _Mapping]] = ..., stable: _Optional[_Union[CanaryFigures, _Mapping]] = ..., decide_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., traffic_fraction: _Optional[float] = ...) -> None: ...

class ListCanaryDecisionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListCanaryDecisionsResponse(_message.Message):
    __slots__ = ("decisions",)
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[CanaryDecision]
    def __init__(self, decisions: _Optional[_Iterable[_Union[CanaryDecision, _Mapping]]] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ("event_time", "type", "model", "summary", "payload_json")
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    event_time: _timestamp_pb2.Timestamp
    type: str
    model: str
    summary: str
    payload_json: str
    def __init__(self, event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., type: _Optional[str] = ..., model: _Optional[str] = ..., summary: _Optional[str] = ..., payload_json: _Optional[str] = ...) -> None: ...
