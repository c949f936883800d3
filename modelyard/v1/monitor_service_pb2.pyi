import datetime

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
SERVICE_KIND_UNSPECIFIED: ServiceKind
SERVICE_KIND_GATEWAY: ServiceKind
SERVICE_KIND_MODEL_SERVER: ServiceKind
SERVICE_KIND_REGISTRY: ServiceKind
SERVICE_KIND_MONITOR: ServiceKind
SERVICE_STATE_UNSPECIFIED: ServiceState
SERVICE_STATE_UP: ServiceState
SERVICE_STATE_DEGRADED: ServiceState
SERVICE_STATE_DOWN: ServiceState

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetClusterStatusResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("id", "kind", "address", "state", "software_version", "start_time", "heartbeat_time", "loaded_versions")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: ServiceKind
    address: str
    state: ServiceState
    software_version: str
    start_time: _timestamp_pb2.Timestamp
    heartbeat_time: _timestamp_pb2.Timestamp
    loaded_versions: _containers.RepeatedCompositeFieldContainer[_model_server_service_pb2.LoadedVersion]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[ServiceKind, str]] = ..., address: _Optional[str] = ..., state: _Optional[_Union[ServiceState, str]] = ..., software_version: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., loaded_versions: _Optional[_Iterable[_Union[_model_server_service_pb2.LoadedVersion, _Mapping]]] = ...) -> None: ...
