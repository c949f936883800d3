import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from modelyard.v1 import inference_service_pb2 as _inference_service_pb2
from modelyard.v1 import registry_pb2 as _registry_pb2
from modelyard.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_LOADING: _ClassVar[VersionState]
    VERSION_STATE_READY: _ClassVar[VersionState]
    VERSION_STATE_UNLOADING: _ClassVar[VersionState]
    VERSION_STATE_FAILED: _ClassVar[VersionState]
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_LOADING: VersionState
VERSION_STATE_READY: VersionState
VERSION_STATE_UNLOADING: VersionState
VERSION_STATE_FAILED: VersionState

class EvaluateOptimizationsRequest(_message.Message):
    __slots__ = ("model", "version", "optimizations", "max_batch", "precisions", "device", "reference_device")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PRECISIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_DEVICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    optimizations: _containers.RepeatedScalarFieldContainer[str]
    max_batch: int
    precisions: _containers.RepeatedScalarFieldContainer[str]
    device: str
    reference_device: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., optimizations: _Optional[_Iterable[str]] = ..., max_batch: _Optional[int] = ..., precisions: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., reference_device: _Optional[str] = ...) -> None: ...

class EvaluateOptimizationsResponse(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[_registry_pb2.OptimizationReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[_registry_pb2.OptimizationReport, _Mapping]]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("model", "version", "inputs", "output_names", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    output_names: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., output_names: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("model", "version", "outputs", "request_id", "timing")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.Tensor]
    request_id: str
    timing: _inference_service_pb2.ServerTiming
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.Tensor, _Mapping]]] = ..., request_id: _Optional[str] = ..., timing: _Optional[_Union[_inference_service_pb2.ServerTiming, _Mapping]] = ...) -> None: ...

class GetServerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerStatusResponse(_message.Message):
    __slots__ = ("server_id", "loaded_versions", "draining")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    loaded_versions: _containers.RepeatedCompositeFieldContainer[LoadedVersion]
    draining: bool
    def __init__(self, server_id: _Optional[str] = ..., loaded_versions: _Optional[_Iterable[_Union[LoadedVersion, _Mapping]]] = ..., draining: _Optional[bool] = ...) -> None: ...

class LoadedVersion(_message.Message):
    __slots__ = ("model", "version", "state", "error", "signature", "device", "outstanding_requests", "ready_time")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    READY_TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state: VersionState
    error: str
    signature: _tensor_pb2.Signature
    device: str
    outstanding_requests: int
    ready_time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[VersionState, str]] = ..., error: _Optional[str] = ..., signature: _Optional[_Union[_tensor_pb2.Signature, _Mapping]] = ..., device: _Optional[str] = ..., outstanding_requests: _Optional[int] = ..., ready_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
