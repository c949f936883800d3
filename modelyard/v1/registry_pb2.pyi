import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from modelyard.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_FORMAT_UNSPECIFIED: _ClassVar[ArtifactFormat]
    ARTIFACT_FORMAT_TORCHSCRIPT: _ClassVar[ArtifactFormat]
    ARTIFACT_FORMAT_TORCH_EXPORT: _ClassVar[ArtifactFormat]

class ModelVersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_VERSION_STATE_UNSPECIFIED: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_ACTIVE: _ClassVar[ModelVersionState]
    MODEL_VERSION_STATE_ARCHIVED: _ClassVar[ModelVersionState]

class AliasMoveKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIAS_MOVE_KIND_UNSPECIFIED: _ClassVar[AliasMoveKind]
    ALIAS_MOVE_KIND_SET: _ClassVar[AliasMoveKind]
    ALIAS_MOVE_KIND_PROMOTE: _ClassVar[AliasMoveKind]
    ALIAS_MOVE_KIND_ROLLBACK: _ClassVar[AliasMoveKind]
    ALIAS_MOVE_KIND_CANARY_PROMOTE: _ClassVar[AliasMoveKind]
    ALIAS_MOVE_KIND_CANARY_ROLLBACK: _ClassVar[AliasMoveKind]
ARTIFACT_FORMAT_UNSPECIFIED: ArtifactFormat
ARTIFACT_FORMAT_TORCHSCRIPT: ArtifactFormat
ARTIFACT_FORMAT_TORCH_EXPORT: ArtifactFormat
MODEL_VERSION_STATE_UNSPECIFIED: ModelVersionState
MODEL_VERSION_STATE_ACTIVE: ModelVersionState
MODEL_VERSION_STATE_ARCHIVED: ModelVersionState
ALIAS_MOVE_KIND_UNSPECIFIED: AliasMoveKind
ALIAS_MOVE_KIND_SET: AliasMoveKind
ALIAS_MOVE_KIND_PROMOTE: AliasMoveKind
ALIAS_MOVE_KIND_ROLLBACK: AliasMoveKind
ALIAS_MOVE_KIND_CANARY_PROMOTE: AliasMoveKind
ALIAS_MOVE_KIND_CANARY_ROLLBACK: AliasMoveKind

class Model(_message.Message):
    __slots__ = ("name", "description", "create_time", "latest_version", "aliases", "require_signature")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    create_time: _timestamp_pb2.Timestamp
    latest_version: int
    aliases: _containers.RepeatedCompositeFieldContainer[Alias]
    require_signature: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latest_version: _Optional[int] = ..., aliases: _Optional[_Iterable[_Union[Alias, _Mapping]]] = ..., require_signature: _Optional[bool] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model", "version", "format", "sha256", "size_bytes", "signature", "description", "labels", "metrics", "created_by", "create_time", "state", "input_baselines", "signer", "model_signature", "origin", "optimization_reports")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUT_BASELINES_FIELD_NUMBER: _ClassVar[int]
    SIGNER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_REPORTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    format: ArtifactFormat
    sha256: str
    size_bytes: int
    signature: _tensor_pb2.Signature
    description: str
    labels: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    created_by: str
    create_time: _timestamp_pb2.Timestamp
    state: ModelVersionState
    input_baselines: _containers.RepeatedCompositeFieldContainer[InputBaseline]
    signer: str
    model_signature: bytes
    origin: VersionOrigin
    optimization_reports: _containers.RepeatedCompositeFieldContainer[OptimizationReport]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., format: _Optional[_Union[ArtifactFormat, str]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., signature: _Optional[_Union[_tensor_pb2.Signature, _Mapping]] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., created_by: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[ModelVersionState, str]] = ..., input_baselines: _Optional[_Iterable[_Union[InputBaseline, _Mapping]]] = ..., signer: _Optional[str] = ..., model_signature: _Optional[bytes] = ..., origin: _Optional[_Union[VersionOrigin, _Mapping]] = ..., optimization_reports: _Optional[_Iterable[_Union[OptimizationReport, _Mapping]]] = ...) -> None: ...

class OptimizationReport(_message.Message):
    __slots__ = ("optimization", "precision", "device", "max_abs_error", "max_rel_error", "top1_agreement", "items_per_s_batch1", "items_per_s_max_batch", "max_batch", "load_time", "sample", "sample_items", "compile_cache_hit", "error", "server_id", "time", "reference_device")
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_S_BATCH1_FIELD_NUMBER: _ClassVar[int]
    ITEMS_PER_S_MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    LOAD_TIME_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    COMPILE_CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DEVICE_FIELD_NUMBER: _ClassVar[int]
    optimization: str
    precision: str
    device: str
    max_abs_error: float
    max_rel_error: float
    top1_agreement: float
    items_per_s_batch1: float
    items_per_s_max_batch: float
    max_batch: int
    load_time: _duration_pb2.Duration
    sample: str
    sample_items: int
    compile_cache_hit: bool
    error: str
    server_id: str
    time: _timestamp_pb2.Timestamp
    reference_device: str
    def __init__(self, optimization: _Optional[str] = ..., precision: _Optional[str] = ..., device: _Optional[str] = ..., max_abs_error: _Optional[float] = ..., max_rel_error: _Optional[float] = ..., top1_agreement: _Optional[float] = ..., items_per_s_batch1: _Optional[float] = ..., items_per_s_max_batch: _Optional[float] = ..., max_batch: _Optional[int] = ..., load_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., sample: _Optional[str] = ..., sample_items: _Optional[int] = ..., compile_cache_hit: _Optional[bool] = ..., error: _Optional[str] = ..., server_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reference_device: _Optional[str] = ...) -> None: ...

class InputBaseline(_message.Message):
    __slots__ = ("input", "item_count", "features")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    input: str
    item_count: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureBaseline]
    def __init__(self, input: _Optional[str] = ..., item_count: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureBaseline, _Mapping]]] = ...) -> None: ...

class FeatureBaseline(_message.Message):
    __slots__ = ("mean", "std", "bin_edges", "bin_fractions")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    BIN_FRACTIONS_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    bin_edges: _containers.RepeatedScalarFieldContainer[float]
    bin_fractions: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., bin_edges: _Optional[_Iterable[float]] = ..., bin_fractions: _Optional[_Iterable[float]] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("name", "version", "update_time")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AliasHistoryEntry(_message.Message):
    __slots__ = ("model", "alias", "from_version", "to_version", "epoch", "reason", "actor", "request_id", "time", "kind")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    from_version: int
    to_version: int
    epoch: int
    reason: str
    actor: str
    request_id: str
    time: _timestamp_pb2.Timestamp
    kind: AliasMoveKind
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., request_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[_Union[AliasMoveKind, str]] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("pinned_versions", "replicas", "device", "precision", "max_batch_size", "max_queue_delay_ms", "max_queue_size", "instances", "traffic_split", "shadow_alias", "shadow_fraction", "placed_versions", "epoch", "preferred_batch_sizes", "execution", "optimization", "max_abs_error", "min_top1_agreement")
    class TrafficSplitEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PINNED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_ALIAS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FRACTION_FIELD_NUMBER: _ClassVar[int]
    PLACED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATION_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_ERROR_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    pinned_versions: _containers.RepeatedScalarFieldContainer[int]
    replicas: int
    device: str
    precision: str
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int
    traffic_split: _containers.ScalarMap[str, int]
    shadow_alias: str
    shadow_fraction: float
    placed_versions: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    execution: str
    optimization: str
    max_abs_error: float
    min_top1_agreement: float
    def __init__(self, pinned_versions: _Optional[_Iterable[int]] = ..., replicas: _Optional[int] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., instances: _Optional[int] = ..., traffic_split: _Optional[_Mapping[str, int]] = ..., shadow_alias: _Optional[str] = ..., shadow_fraction: _Optional[float] = ..., placed_versions: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., execution: _Optional[str] = ..., optimization: _Optional[str] = ..., max_abs_error: _Optional[float] = ..., min_top1_agreement: _Optional[float] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "time", "actor", "method", "model", "target", "request_id", "outcome", "error_reason", "message", "prev_hash", "entry_hash")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: _timestamp_pb2.Timestamp
    actor: str
    method: str
    model: str
    target: str
    request_id: str
    outcome: str
    error_reason: str
    message: str
    prev_hash: str
    entry_hash: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., method: _Optional[str] = ..., model: _Optional[str] = ..., target: _Optional[str] = ..., request_id: _Optional[str] = ..., outcome: _Optional[str] = ..., error_reason: _Optional[str] = ..., message: _Optional[str] = ..., prev_hash: _Optional[str] = ..., entry_hash: _Optional[str] = ...) -> None: ...

class VersionOrigin(_message.Message):
    __slots__ = ("source_cluster", "source_version", "source_sha256")
    SOURCE_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    SOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    source_cluster: str
    source_version: int
    source_sha256: str
    def __init__(self, source_cluster: _Optional[str] = ..., source_version: _Optional[int] = ..., source_sha256: _Optional[str] = ...) -> None: ...
