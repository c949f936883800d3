"""The registry core's value types and name rules. No gRPC here; `convert` maps them to protobuf.

The signature stays a `modelyard.v1.Signature` message: it is the schema gateways and model
servers validate requests against, so every service reads it in the same form.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field

from modelyard.errors import InvalidArgument
from modelyard.v1 import registry_pb2, tensor_pb2

__all__ = [
    "NAME_PATTERN",
    "check_name",
    "ArtifactFormat",
    "VersionState",
    "MoveKind",
    "AliasRecord",
    "ModelRecord",
    "VersionRecord",
    "UploadMetadata",
    "AliasChange",
    "DeploymentSpec",
    "RoutingState",
    "DeploymentChange",
    "HistoryEntry",
    "AuditRecord",
    "AuditFilter",
    "DeleteOutcome",
    "VersionOrigin",
    "ImportItem",
]

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,62}")
"""Model and alias names: a lower-case letter, then letters, digits, '-' or '_'; 63 at most."""


def check_name(value: str, *, field: str, what: str) -> str:
    """Return `value` if it is a valid model or alias name.

    Raises:
        InvalidArgument: naming `field`, with the rule the name breaks.
    """
    if NAME_PATTERN.fullmatch(value) is None:
        shown = repr(value) if value else "empty"
        raise InvalidArgument(
            f"{what} name {shown} is not valid: use 1 to 63 lower-case letters, digits, '-' "
            "or '_', starting with a letter",
            field=field,
        )
    return value


class ArtifactFormat(enum.Enum):
    """The file format of an artifact; the value is what the database stores."""

    TORCHSCRIPT = "torchscript"
    TORCH_EXPORT = "torch_export"


class VersionState(enum.Enum):
    """The lifecycle of a version; the value is what the database stores."""

    ACTIVE = "active"
    ARCHIVED = "archived"


class MoveKind(enum.Enum):
    """What an alias move was (`modelyard.v1.AliasMoveKind`); the value is what the
    database stores ("" on moves recorded before moves were typed)."""

    UNSPECIFIED = ""
    SET = "set"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    CANARY_PROMOTE = "canary_promote"
    CANARY_ROLLBACK = "canary_rollback"


@dataclass(frozen=True, slots=True)
class AliasRecord:
    """A named pointer at one version of a model."""

    name: str
    version: int
    update_time: float
    """Unix seconds of the last move."""


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """A model with its aliases (sorted by name)."""

    name: str
    description: str
    create_time: float
    latest_version: int
    """The highest version number uploaded so far; 0 when there is none."""
    epoch: int
    """Grows with every alias change; Redis keeps a write only if its epoch is newer."""
    aliases: tuple[AliasRecord, ...] = ()
    require_signature: bool = False
    """Every version must carry a model signature by a trusted signer (set at creation)."""


@dataclass(frozen=True, slots=True)
class VersionOrigin:
    """Where an imported version came from: the cluster, its number and hash there."""

    source_cluster: str
    source_version: int
    source_sha256: str


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One immutable, numbered version of a model."""

    model: str
    version: int
    format: ArtifactFormat
    sha256: str
    size_bytes: int
    signature: tensor_pb2.Signature
    description: str
    labels: dict[str, str]
    metrics: dict[str, float]
    created_by: str
    create_time: float
    state: VersionState
    input_baselines: tuple[registry_pb2.InputBaseline, ...] = ()
    """Input statistics recorded at registration (the drift reference); empty if none."""
    signer: str = ""
    """Who signed the artifact, as verified at upload; empty when unsigned."""
    model_signature: bytes = b""
    """The OpenSSF model signing bundle uploaded with the version; empty when unsigned."""
    origin: VersionOrigin | None = None
    """Where the version was imported from (a migration bundle); None when uploaded here."""
    optimization_reports: tuple[registry_pb2.OptimizationReport, ...] = ()
    """Accuracy and speed per profile × precision × device, as model servers measured them
    (GetModelVersion only; listings leave them out)."""


@dataclass(frozen=True, slots=True)
class UploadMetadata:
    """What an uploader says about the artifact it is about to send."""

    model: str
    format: ArtifactFormat | None
    """None when the uploader left it unset (or sent a value this registry does not know)."""
    sha256: str
    signature: tensor_pb2.Signature
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    request_id: str = ""
    input_baselines: tuple[registry_pb2.InputBaseline, ...] = ()
    """Optional input statistics to record with the version (checked by the registry)."""
    model_signature: bytes = b""
    """Optional OpenSSF model signing bundle of the artifact (verified by the registry)."""


@dataclass(frozen=True, slots=True)
class ImportItem:
    """One version of a migration bundle, checked and with its artifact stored, to record."""

    metadata: UploadMetadata
    size_bytes: int
    signer: str
    """Who signed it, as verified by this registry ("" when unsigned)."""
    origin: VersionOrigin


@dataclass(frozen=True, slots=True)
class AliasChange:
    """The outcome of a set-alias call."""

    model: str
    alias: AliasRecord
    previous_version: int
    """What the alias pointed at before; 0 if it did not exist."""
    epoch: int
    """The model's epoch after the call."""
    aliases: dict[str, int]
    """The model's whole alias map after the call (what Redis must hold)."""
    changed: bool
    """False when nothing moved: the alias already pointed there, or the call is a retry of
    one already applied (same request id)."""
    state: RoutingState | None = None
    """The model's whole routing state after the call (what Redis must hold)."""


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """How a model is served, as an operator set it (what SetDeployment takes).

    Zero / empty / None serving fields mean "the model server's default".
    """

    pinned_versions: tuple[int, ...] = ()
    replicas: int = 0
    device: str = ""
    precision: str = ""
    max_batch_size: int = 0
    max_queue_delay_ms: float | None = None
    max_queue_size: int = 0
    instances: int = 0
    traffic_split: dict[str, int] = field(default_factory=dict)
    shadow_alias: str = ""
    shadow_fraction: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()
    execution: str = ""
    optimization: str = ""
    max_abs_error: float | None = None
    min_top1_agreement: float | None = None

    def to_json(self) -> str:
        """The form the database stores."""
        return json.dumps(
            {
                "pinned_versions": list(self.pinned_versions),
                "replicas": self.replicas,
                "device": self.device,
                "precision": self.precision,
                "max_batch_size": self.max_batch_size,
                "max_queue_delay_ms": self.max_queue_delay_ms,
                "max_queue_size": self.max_queue_size,
                "instances": self.instances,
                "traffic_split": dict(sorted(self.traffic_split.items())),
                "shadow_alias": self.shadow_alias,
                "shadow_fraction": self.shadow_fraction,
                "preferred_batch_sizes": list(self.preferred_batch_sizes),
                "execution": self.execution,
                "optimization": self.optimization,
                "max_abs_error": self.max_abs_error,
                "min_top1_agreement": self.min_top1_agreement,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> DeploymentSpec:
        data = json.loads(text)
        data["pinned_versions"] = tuple(data.get("pinned_versions", ()))
        # Specs stored before these fields existed lack them: the defaults apply.
        data["preferred_batch_sizes"] = tuple(data.get("preferred_batch_sizes", ()))
        return cls(**data)


@dataclass(frozen=True, slots=True)
class RoutingState:
    """Everything Redis must hold for one model: its aliases and deployment, under its epoch."""

    model: str
    aliases: dict[str, int]
    epoch: int
    spec: DeploymentSpec
    placed_versions: tuple[int, ...]
    """Aliased, pinned, and held (recently replaced or being promoted) versions, sorted."""


@dataclass(frozen=True, slots=True)
class DeploymentChange:
    """The outcome of a set-deployment call: the deployment before, and the state after."""

    previous: DeploymentSpec
    """The deployment as it was before the call (the defaults if none was ever set)."""
    state: RoutingState
    """The model's whole routing state after the call."""


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One recorded move of an alias."""

    id: int
    model: str
    alias: str
    from_version: int
    to_version: int
    epoch: int
    reason: str
    actor: str
    request_id: str
    time: float
    kind: MoveKind = MoveKind.UNSPECIFIED
    """What the move was; UNSPECIFIED on moves recorded before moves were typed."""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One mutating call and its outcome ("OK" or a gRPC status code name)."""

    time: float
    actor: str
    method: str
    model: str
    target: str
    request_id: str
    outcome: str
    error_reason: str = ""
    message: str = ""
    id: int = 0
    """Assigned by the store."""
    prev_hash: str = ""
    """The hash chain (`modelyard.audit_chain`), set by the store; empty on entries recorded
    before the chain existed."""
    entry_hash: str = ""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which audit entries to list; empty fields match everything."""

    model: str = ""
    actor: str = ""
    method: str = ""
    outcome: str = ""
    start_time: float = 0.0


@dataclass(frozen=True, slots=True)
class DeleteOutcome:
    """What deleting a version removed."""

    sha256: str
    artifact_unreferenced: bool
    """True when no other version shares the artifact, so its file can go."""
    state: RoutingState
