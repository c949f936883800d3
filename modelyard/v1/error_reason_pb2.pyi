from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from typing import ClassVar as _ClassVar

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_VERSION_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_ALIAS_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_ARGUMENT: _ClassVar[ErrorReason]
    ERROR_REASON_SIGNATURE_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_ALREADY_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_CONFLICT: _ClassVar[ErrorReason]
    ERROR_REASON_CHECKSUM_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_ARTIFACT_CORRUPT: _ClassVar[ErrorReason]
    ERROR_REASON_NO_READY_REPLICA: _ClassVar[ErrorReason]
    ERROR_REASON_VERSION_NOT_READY: _ClassVar[ErrorReason]
    ERROR_REASON_QUEUE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_DRAINING: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_FAILED_PRECONDITION: _ClassVar[ErrorReason]
    ERROR_REASON_COORDINATION_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_ERROR: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_FAILED_ON_INPUT: _ClassVar[ErrorReason]
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_MODEL_NOT_FOUND: ErrorReason
ERROR_REASON_VERSION_NOT_FOUND: ErrorReason
ERROR_REASON_ALIAS_NOT_FOUND: ErrorReason
ERROR_REASON_INVALID_ARGUMENT: ErrorReason
ERROR_REASON_SIGNATURE_MISMATCH: ErrorReason
ERROR_REASON_ALREADY_EXISTS: ErrorReason
ERROR_REASON_CONFLICT: ErrorReason
ERROR_REASON_CHECKSUM_MISMATCH: ErrorReason
ERROR_REASON_ARTIFACT_CORRUPT: ErrorReason
ERROR_REASON_NO_READY_REPLICA: ErrorReason
ERROR_REASON_VERSION_NOT_READY: ErrorReason
ERROR_REASON_QUEUE_FULL: ErrorReason
ERROR_REASON_DRAINING: ErrorReason
ERROR_REASON_DEADLINE_EXCEEDED: ErrorReason
ERROR_REASON_FAILED_PRECONDITION: ErrorReason
ERROR_REASON_COORDINATION_UNAVAILABLE: ErrorReason
ERROR_REASON_MODEL_ERROR: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_TOO_LARGE: ErrorReason
ERROR_REASON_MODEL_FAILED_ON_INPUT: ErrorReason
