import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from modelyard.v1 import registry_pb2 as _registry_pb2
from modelyard.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CreateModelRequest(_message.Message):
    __slots__ = ("name", "description", "request_id", "require_signature")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    request_id: str
    require_signature: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., request_id: _Optional[str] = ..., require_signature: _Optional[bool] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _registry_pb2.Model
    def __init__(self, model: _Optional[_Union[_registry_pb2.Model, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: _registry_pb2.Model
    def __init__(self, model: _Optional[_Union[_registry_pb2.Model, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[_registry_pb2.Model]
    def __init__(self, models: _Optional[_Iterable[_Union[_registry_pb2.Model, _Mapping]]] = ...) -> None: ...

class UploadModelVersionMetadata(_message.Message):
    __slots__ = ("model", "format", "sha256", "signature", "description", "labels", "metrics", "request_id", "input_baselines", "model_signature")
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
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_BASELINES_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    format: _registry_pb2.ArtifactFormat
    sha256: str
    signature: _tensor_pb2.Signature
    description: str
    labels: _containers.ScalarMap[str, str]
    metrics: _containers.ScalarMap[str, float]
    request_id: str
    input_baselines: _containers.RepeatedCompositeFieldContainer[_registry_pb2.InputBaseline]
    model_signature: bytes
    def __init__(self, model: _Optional[str] = ..., format: _Optional[_Union[_registry_pb2.ArtifactFormat, str]] = ..., sha256: _Optional[str] = ..., signature: _Optional[_Union[_tensor_pb2.Signature, _Mapping]] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., request_id: _Optional[str] = ..., input_baselines: _Optional[_Iterable[_Union[_registry_pb2.InputBaseline, _Mapping]]] = ..., model_signature: _Optional[bytes] = ...) -> None: ...

class UploadModelVersionRequest(_message.Message):
    __slots__ = ("metadata", "chunk")
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    metadata: UploadModelVersionMetadata
    chunk: bytes
    def __init__(self, metadata: _Optional[_Union[UploadModelVersionMetadata, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadModelVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: _registry_pb2.ModelVersion
    def __init__(self, model_version: _Optional[_Union[_registry_pb2.ModelVersion, _Mapping]] = ...) -> None: ...

class GetModelVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: _registry_pb2.ModelVersion
    def __init__(self, model_version: _Optional[_Union[_registry_pb2.ModelVersion, _Mapping]] = ...) -> None: ...

class ListModelVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListModelVersionsResponse(_message.Message):
    __slots__ = ("model_versions",)
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model_versions: _containers.RepeatedCompositeFieldContainer[_registry_pb2.ModelVersion]
    def __init__(self, model_versions: _Optional[_Iterable[_Union[_registry_pb2.ModelVersion, _Mapping]]] = ...) -> None: ...

class DownloadModelVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DownloadModelVersionResponse(_message.Message):
    __slots__ = ("chunk", "sha256", "size_bytes")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    sha256: str
    size_bytes: int
    def __init__(self, chunk: _Optional[bytes] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("model", "alias", "version", "expected_version", "reason", "request_id", "expected_epoch", "kind")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    version: int
    expected_version: int
    reason: str
    request_id: str
    expected_epoch: int
    kind: _registry_pb2.AliasMoveKind
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ..., expected_version: _Optional[int] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., expected_epoch: _Optional[int] = ..., kind: _Optional[_Union[_registry_pb2.AliasMoveKind, str]] = ...) -> None: ...

class SetAliasResponse(_message.Message):
    __slots__ = ("alias", "previous_version", "epoch")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    alias: _registry_pb2.Alias
    previous_version: int
    epoch: int
    def __init__(self, alias: _Optional[_Union[_registry_pb2.Alias, _Mapping]] = ..., previous_version: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class RollbackAliasRequest(_message.Message):
    __slots__ = ("model", "alias", "expected_version", "reason", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    expected_version: int
    reason: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., expected_version: _Optional[int] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RollbackAliasResponse(_message.Message):
    __slots__ = ("alias", "previous_version", "epoch")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    alias: _registry_pb2.Alias
    previous_version: int
    epoch: int
    def __init__(self, alias: _Optional[_Union[_registry_pb2.Alias, _Mapping]] = ..., previous_version: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class ListAliasHistoryRequest(_message.Message):
    __slots__ = ("model", "alias", "page_size", "page_token", "kind")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    page_size: int
    page_token: str
    kind: _registry_pb2.AliasMoveKind
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[_registry_pb2.AliasMoveKind, str]] = ...) -> None: ...

class ListAliasHistoryResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_registry_pb2.AliasHistoryEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[_registry_pb2.AliasHistoryEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PromoteVersionRequest(_message.Message):
    __slots__ = ("model", "alias", "version", "expected_version", "ready_timeout", "reason", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    version: int
    expected_version: int
    ready_timeout: _duration_pb2.Duration
    reason: str
    request_id: str
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ..., expected_version: _Optional[int] = ..., ready_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class PromoteVersionResponse(_message.Message):
    __slots__ = ("alias", "previous_version", "epoch", "ready_replicas")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    alias: _registry_pb2.Alias
    previous_version: int
    epoch: int
    ready_replicas: int
    def __init__(self, alias: _Optional[_Union[_registry_pb2.Alias, _Mapping]] = ..., previous_version: _Optional[int] = ..., epoch: _Optional[int] = ..., ready_replicas: _Optional[int] = ...) -> None: ...

class SetDeploymentRequest(_message.Message):
    __slots__ = ("model", "deployment", "request_id", "expected_epoch", "update_mask", "skip_proof")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EPOCH_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    SKIP_PROOF_FIELD_NUMBER: _ClassVar[int]
    model: str
    deployment: _registry_pb2.Deployment
    request_id: str
    expected_epoch: int
    update_mask: _field_mask_pb2.FieldMask
    skip_proof: bool
    def __init__(self, model: _Optional[str] = ..., deployment: _Optional[_Union[_registry_pb2.Deployment, _Mapping]] = ..., request_id: _Optional[str] = ..., expected_epoch: _Optional[int] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ..., skip_proof: _Optional[bool] = ...) -> None: ...

class SetDeploymentResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: _registry_pb2.Deployment
    def __init__(self, deployment: _Optional[_Union[_registry_pb2.Deployment, _Mapping]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetDeploymentResponse(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: _registry_pb2.Deployment
    def __init__(self, deployment: _Optional[_Union[_registry_pb2.Deployment, _Mapping]] = ...) -> None: ...

class ArchiveModelVersionRequest(_message.Message):
    __slots__ = ("model", "version", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class ArchiveModelVersionResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: _registry_pb2.ModelVersion
    def __init__(self, model_version: _Optional[_Union[_registry_pb2.ModelVersion, _Mapping]] = ...) -> None: ...

class DeleteModelVersionRequest(_message.Message):
    __slots__ = ("model", "version", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeleteModelVersionResponse(_message.Message):
    __slots__ = ("artifact_deleted",)
    ARTIFACT_DELETED_FIELD_NUMBER: _ClassVar[int]
    artifact_deleted: bool
    def __init__(self, artifact_deleted: _Optional[bool] = ...) -> None: ...

class ListAuditEntriesRequest(_message.Message):
    __slots__ = ("model", "actor", "method", "outcome", "start_time", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    actor: str
    method: str
    outcome: str
    start_time: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., actor: _Optional[str] = ..., method: _Optional[str] = ..., outcome: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_registry_pb2.AuditEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[_registry_pb2.AuditEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("model", "versions", "aliases")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    aliases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., aliases: _Optional[_Iterable[str]] = ...) -> None: ...

class ExportModelResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class ImportModelOptions(_message.Message):
    __slots__ = ("with_aliases", "request_id")
    WITH_ALIASES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    with_aliases: bool
    request_id: str
    def __init__(self, with_aliases: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class ImportModelRequest(_message.Message):
    __slots__ = ("options", "chunk")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    options: ImportModelOptions
    chunk: bytes
    def __init__(self, options: _Optional[_Union[ImportModelOptions, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class ImportedVersion(_message.Message):
    __slots__ = ("source_version", "model_version", "created")
    SOURCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    source_version: int
    model_version: _registry_pb2.ModelVersion
    created: bool
    def __init__(self, source_version: _Optional[int] = ..., model_version: _Optional[_Union[_registry_pb2.ModelVersion, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ImportedAlias(_message.Message):
    __slots__ = ("alias", "version", "previous_version", "moved_by")
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    MOVED_BY_FIELD_NUMBER: _ClassVar[int]
    alias: str
    version: int
    previous_version: int
    moved_by: str
    def __init__(self, alias: _Optional[str] = ..., version: _Optional[int] = ..., previous_version: _Optional[int] = ..., moved_by: _Optional[str] = ...) -> None: ...

class ImportModelResponse(_message.Message):
    __slots__ = ("model", "source_cluster", "versions", "aliases", "bundle_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    source_cluster: str
    versions: _containers.RepeatedCompositeFieldContainer[ImportedVersion]
    aliases: _containers.RepeatedCompositeFieldContainer[ImportedAlias]
    bundle_bytes: int
    def __init__(self, model: _Optional[str] = ..., source_cluster: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ImportedVersion, _Mapping]]] = ..., aliases: _Optional[_Iterable[_Union[ImportedAlias, _Mapping]]] = ..., bundle_bytes: _Optional[int] = ...) -> None: ...

class RecordOptimizationReportsRequest(_message.Message):
    __slots__ = ("model", "version", "reports", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    reports: _containers.RepeatedCompositeFieldContainer[_registry_pb2.OptimizationReport]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., reports: _Optional[_Iterable[_Union[_registry_pb2.OptimizationReport, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RecordOptimizationReportsResponse(_message.Message):
    __slots__ = ("model_version",)
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_version: _registry_pb2.ModelVersion
    def __init__(self, model_version: _Optional[_Union[_registry_pb2.ModelVersion, _Mapping]] = ...) -> None: ...
