"""The domain error tree. No grpc here: `modelyard.rpc.errors` maps each class to a status.

    ModelyardError                      reason
    ├── NotFound
    │   ├── ModelNotFound               MODEL_NOT_FOUND
    │   ├── VersionNotFound             VERSION_NOT_FOUND
    │   └── AliasNotFound               ALIAS_NOT_FOUND
    ├── InvalidArgument                 INVALID_ARGUMENT
    │   ├── SignatureMismatch           SIGNATURE_MISMATCH
    │   ├── ModelFailedOnInput          MODEL_FAILED_ON_INPUT (the forward raised on this input)
    │   ├── ChecksumMismatch            CHECKSUM_MISMATCH
    │   ├── TooLarge                    TOO_LARGE
    │   ├── UnsafeArtifact              UNSAFE_ARTIFACT     (an archive part that could run code)
    │   └── ModelSignatureInvalid       MODEL_SIGNATURE_INVALID
    ├── AlreadyExists                   ALREADY_EXISTS
    ├── Conflict                        CONFLICT            (a compare-and-set lost)
    ├── FailedPrecondition              FAILED_PRECONDITION
    ├── Unavailable                                         (retryable)
    │   ├── NoReadyReplica              NO_READY_REPLICA
    │   ├── VersionNotReady             VERSION_NOT_READY
    │   ├── Draining                    DRAINING
    │   └── CoordinationUnavailable     COORDINATION_UNAVAILABLE
    ├── QueueFull                       QUEUE_FULL          (retry after retry_after_s)
    │   └── RateLimited                 RATE_LIMITED        (a key over its limits)
    ├── Unauthenticated                 UNAUTHENTICATED     (no, or no valid, credentials)
    ├── PermissionDenied                PERMISSION_DENIED   (metadata `grant`: the one lacking)
    ├── DeadlineExceeded                DEADLINE_EXCEEDED
    ├── ArtifactCorrupt                 ARTIFACT_CORRUPT
    └── ModelExecutionError             MODEL_ERROR

Each reason is a value of `modelyard.v1.ErrorReason` without its prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

__all__ = [
    "ModelyardError",
    "NotFound",
    "ModelNotFound",
    "VersionNotFound",
    "AliasNotFound",
    "InvalidArgument",
    "SignatureMismatch",
    "ModelFailedOnInput",
    "ChecksumMismatch",
    "TooLarge",
    "UnsafeArtifact",
    "ModelSignatureInvalid",
    "AlreadyExists",
    "Conflict",
    "FailedPrecondition",
    "Unavailable",
    "NoReadyReplica",
    "VersionNotReady",
    "Draining",
    "CoordinationUnavailable",
    "QueueFull",
    "DeadlineExceeded",
    "ArtifactCorrupt",
    "ModelExecutionError",
    "RateLimited",
    "Unauthenticated",
    "PermissionDenied",
    "BundleInvalid",
]


class ModelyardError(Exception):
    """Base of every error a Modelyard service reports to its callers.

    Args:
        message: What went wrong and what to fix, for the caller. Never internals.
        field: The request field at fault (reported as google.rpc.BadRequest), if any.
        metadata: Extra key/values for google.rpc.ErrorInfo.metadata.
        retry_after_s: A hint for when to retry (reported as google.rpc.RetryInfo).
    """

    reason: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s


class NotFound(ModelyardError):
    reason = "MODEL_NOT_FOUND"


class ModelNotFound(NotFound):
    reason = "MODEL_NOT_FOUND"


class VersionNotFound(NotFound):
    reason = "VERSION_NOT_FOUND"


class AliasNotFound(NotFound):
    reason = "ALIAS_NOT_FOUND"


class InvalidArgument(ModelyardError):
    reason = "INVALID_ARGUMENT"


class SignatureMismatch(InvalidArgument):
    reason = "SIGNATURE_MISMATCH"


class ModelFailedOnInput(InvalidArgument):
    """The model's forward raised on this request's own input (for example a token id past
    an embedding's vocabulary), alone or isolated from the other requests of its batch."""

    reason = "MODEL_FAILED_ON_INPUT"


class ChecksumMismatch(InvalidArgument):
    reason = "CHECKSUM_MISMATCH"


class BundleInvalid(InvalidArgument):
    """A migration bundle is malformed or lies: a bad tar member, a manifest that does not
    parse or does not match the artifacts, or a truncated stream. Nothing of it is stored."""

    reason = "BUNDLE_INVALID"


class TooLarge(InvalidArgument):
    reason = "TOO_LARGE"


class UnsafeArtifact(InvalidArgument):
    """An artifact holds a part that is not allowed: something loading it could unpickle or
    execute, a path outside the archive, or more than the archive limits."""

    reason = "UNSAFE_ARTIFACT"


class ModelSignatureInvalid(InvalidArgument):
    """A model signature (OpenSSF model signing) is missing where one is required, malformed,
    made by a signer the cluster does not trust, or over other bytes."""

    reason = "MODEL_SIGNATURE_INVALID"


class AlreadyExists(ModelyardError):
    reason = "ALREADY_EXISTS"


class Conflict(ModelyardError):
    reason = "CONFLICT"


class FailedPrecondition(ModelyardError):
    reason = "FAILED_PRECONDITION"


class Unavailable(ModelyardError):
    reason = "NO_READY_REPLICA"


class NoReadyReplica(Unavailable):
    reason = "NO_READY_REPLICA"


class VersionNotReady(Unavailable):
    reason = "VERSION_NOT_READY"


class Draining(Unavailable):
    reason = "DRAINING"


class CoordinationUnavailable(Unavailable):
    reason = "COORDINATION_UNAVAILABLE"


class QueueFull(ModelyardError):
    reason = "QUEUE_FULL"


class RateLimited(QueueFull):
    reason = "RATE_LIMITED"


class Unauthenticated(ModelyardError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(ModelyardError):
    reason = "PERMISSION_DENIED"


class DeadlineExceeded(ModelyardError):
    reason = "DEADLINE_EXCEEDED"


class ArtifactCorrupt(ModelyardError):
    reason = "ARTIFACT_CORRUPT"


class ModelExecutionError(ModelyardError):
    reason = "MODEL_ERROR"
