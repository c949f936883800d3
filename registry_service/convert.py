"""Conversions between the registry core's records and the `modelyard.v1` messages: tables
plus pure functions, the servicer's only encoding and decoding."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from modelyard import audit_chain
from modelyard.errors import InvalidArgument
from modelyard.v1 import registry_pb2, registry_service_pb2
from registry_service.migration import ImportOutcome
from registry_service.records import (
    AliasChange,
    AliasRecord,
    ArtifactFormat,
    AuditRecord,
    DeploymentSpec,
    HistoryEntry,
    ModelRecord,
    MoveKind,
    RoutingState,
    UploadMetadata,
    VersionRecord,
    VersionState,
)

__all__ = [
    "FORMAT_TO_PROTO",
    "FORMAT_FROM_PROTO",
    "STATE_TO_PROTO",
    "MOVE_KIND_TO_PROTO",
    "MOVE_KIND_FROM_PROTO",
    "timestamp",
    "alias_to_proto",
    "model_to_proto",
    "version_to_proto",
    "upload_metadata_from_proto",
    "set_alias_response",
    "history_entry_to_proto",
    "move_kind_from_proto",
    "deployment_to_proto",
    "deployment_spec_from_proto",
    "audit_to_proto",
    "page_token_to_id",
    "next_page_token",
]

FORMAT_TO_PROTO: dict[ArtifactFormat, registry_pb2.ArtifactFormat] = {
    ArtifactFormat.TORCHSCRIPT: registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    ArtifactFormat.TORCH_EXPORT: registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT,
}
FORMAT_FROM_PROTO: dict[int, ArtifactFormat] = {int(v): k for k, v in FORMAT_TO_PROTO.items()}

STATE_TO_PROTO: dict[VersionState, registry_pb2.ModelVersionState] = {
    VersionState.ACTIVE: registry_pb2.MODEL_VERSION_STATE_ACTIVE,
    VersionState.ARCHIVED: registry_pb2.MODEL_VERSION_STATE_ARCHIVED,
}


MOVE_KIND_TO_PROTO: dict[MoveKind, registry_pb2.AliasMoveKind] = {
    MoveKind.UNSPECIFIED: registry_pb2.ALIAS_MOVE_KIND_UNSPECIFIED,
    MoveKind.SET: registry_pb2.ALIAS_MOVE_KIND_SET,
    MoveKind.PROMOTE: registry_pb2.ALIAS_MOVE_KIND_PROMOTE,
    MoveKind.ROLLBACK: registry_pb2.ALIAS_MOVE_KIND_ROLLBACK,
    MoveKind.CANARY_PROMOTE: registry_pb2.ALIAS_MOVE_KIND_CANARY_PROMOTE,
    MoveKind.CANARY_ROLLBACK: registry_pb2.ALIAS_MOVE_KIND_CANARY_ROLLBACK,
}
MOVE_KIND_FROM_PROTO: dict[int, MoveKind] = {int(v): k for k, v in MOVE_KIND_TO_PROTO.items()}


def move_kind_from_proto(value: int) -> MoveKind:
    """The core's MoveKind of a request's AliasMoveKind.

    Raises:
        InvalidArgument: a value this registry does not know.
    """
    kind = MOVE_KIND_FROM_PROTO.get(value)
    if kind is None:
        raise InvalidArgument(f"kind {value} is not an AliasMoveKind this registry knows", field="kind")
    return kind


def timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of unix seconds."""
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(round(unix_s * 1e9))
    return ts


def alias_to_proto(alias: AliasRecord) -> registry_pb2.Alias:
    return registry_pb2.Alias(
        name=alias.name, version=alias.version, update_time=timestamp(alias.update_time)
    )


def model_to_proto(model: ModelRecord) -> registry_pb2.Model:
    return registry_pb2.Model(
        name=model.name,
        description=model.description,
        create_time=timestamp(model.create_time),
        latest_version=model.latest_version,
        aliases=[alias_to_proto(a) for a in model.aliases],
        require_signature=model.require_signature,
    )


def version_to_proto(version: VersionRecord) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        model=version.model,
        version=version.version,
        format=FORMAT_TO_PROTO[version.format],
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        signature=version.signature,
        description=version.description,
        labels=version.labels,
        metrics=version.metrics,
        created_by=version.created_by,
        create_time=timestamp(version.create_time),
        state=STATE_TO_PROTO[version.state],
        input_baselines=version.input_baselines,
        signer=version.signer,
        model_signature=version.model_signature,
        optimization_reports=version.optimization_reports,
        origin=(
            registry_pb2.VersionOrigin(
                source_cluster=version.origin.source_cluster,
                source_version=version.origin.source_version,
                source_sha256=version.origin.source_sha256,
            )
            if version.origin is not None
            else None
        ),
    )


def import_outcome_to_proto(outcome: ImportOutcome) -> registry_service_pb2.ImportModelResponse:
    """What an import did, for ImportModel's answer."""
    return registry_service_pb2.ImportModelResponse(
        model=outcome.manifest.model,
        source_cluster=outcome.manifest.source_cluster,
        versions=[
            registry_service_pb2.ImportedVersion(
                source_version=v.source_version, model_version=version_to_proto(v.version), created=v.created
            )
            for v in outcome.versions
        ],
        aliases=[
            registry_service_pb2.ImportedAlias(
                alias=a.alias, version=a.version, previous_version=a.previous_version, moved_by=a.moved_by
            )
            for a in outcome.aliases
        ],
        bundle_bytes=outcome.bytes_read,
    )


def upload_metadata_from_proto(message: registry_service_pb2.UploadModelVersionMetadata) -> UploadMetadata:
    """The core's view of an upload's first message; an unset or unknown format becomes None."""
    return UploadMetadata(
        model=message.model,
        format=FORMAT_FROM_PROTO.get(message.format),
        sha256=message.sha256,
        signature=message.signature,
        description=message.description,
        labels=dict(message.labels),
        metrics=dict(message.metrics),
        request_id=message.request_id,
        input_baselines=tuple(message.input_baselines),
        model_signature=message.model_signature,
    )


def set_alias_response(change: AliasChange) -> registry_service_pb2.SetAliasResponse:
    return registry_service_pb2.SetAliasResponse(
        alias=alias_to_proto(change.alias),
        previous_version=change.previous_version,
        epoch=change.epoch,
    )


def history_entry_to_proto(entry: HistoryEntry) -> registry_pb2.AliasHistoryEntry:
    return registry_pb2.AliasHistoryEntry(
        model=entry.model,
        alias=entry.alias,
        from_version=entry.from_version,
        to_version=entry.to_version,
        epoch=entry.epoch,
        reason=entry.reason,
        actor=entry.actor,
        request_id=entry.request_id,
        time=timestamp(entry.time),
        kind=MOVE_KIND_TO_PROTO[entry.kind],
    )


def deployment_to_proto(state: RoutingState) -> registry_pb2.Deployment:
    spec = state.spec
    message = registry_pb2.Deployment(
        pinned_versions=list(spec.pinned_versions),
        replicas=spec.replicas,
        device=spec.device,
        precision=spec.precision,
        max_batch_size=spec.max_batch_size,
        max_queue_size=spec.max_queue_size,
        instances=spec.instances,
        traffic_split=spec.traffic_split,
        shadow_alias=spec.shadow_alias,
        shadow_fraction=spec.shadow_fraction,
        preferred_batch_sizes=list(spec.preferred_batch_sizes),
        execution=spec.execution,
        optimization=spec.optimization,
        placed_versions=list(state.placed_versions),
        epoch=state.epoch,
    )
    if spec.max_queue_delay_ms is not None:
        message.max_queue_delay_ms = spec.max_queue_delay_ms
    if spec.max_abs_error is not None:
        message.max_abs_error = spec.max_abs_error
    if spec.min_top1_agreement is not None:
        message.min_top1_agreement = spec.min_top1_agreement
    return message


def deployment_spec_from_proto(message: registry_pb2.Deployment) -> DeploymentSpec:
    """The settable part of a Deployment; output-only fields are ignored."""
    return DeploymentSpec(
        pinned_versions=tuple(sorted(set(message.pinned_versions))),
        replicas=message.replicas,
        device=message.device,
        precision=message.precision,
        max_batch_size=message.max_batch_size,
        max_queue_delay_ms=(message.max_queue_delay_ms if message.HasField("max_queue_delay_ms") else None),
        max_queue_size=message.max_queue_size,
        instances=message.instances,
        traffic_split=dict(message.traffic_split),
        shadow_alias=message.shadow_alias,
        shadow_fraction=message.shadow_fraction,
        preferred_batch_sizes=tuple(sorted(set(message.preferred_batch_sizes))),
        execution=message.execution,
        optimization=message.optimization,
        max_abs_error=message.max_abs_error if message.HasField("max_abs_error") else None,
        min_top1_agreement=(message.min_top1_agreement if message.HasField("min_top1_agreement") else None),
    )


def audit_to_proto(record: AuditRecord) -> registry_pb2.AuditEntry:
    # Whole microseconds, exactly: the verifier hashes them (`modelyard.audit_chain`).
    time_us = audit_chain.micros(record.time)
    return registry_pb2.AuditEntry(
        id=record.id,
        time=timestamp_pb2.Timestamp(seconds=time_us // 1_000_000, nanos=time_us % 1_000_000 * 1000),
        actor=record.actor,
        method=record.method,
        model=record.model,
        target=record.target,
        request_id=record.request_id,
        outcome=record.outcome,
        error_reason=record.error_reason,
        message=record.message,
        prev_hash=record.prev_hash,
        entry_hash=record.entry_hash,
    )


def page_token_to_id(token: str) -> int:
    """The id a page token continues below (0: from the newest)."""
    if not token:
        return 0
    if not token.isdigit() or int(token) < 1:
        raise InvalidArgument(
            "page_token is not one this registry issued; pass next_page_token as it came",
            field="page_token",
        )
    return int(token)


def next_page_token(ids: list[int], page_size: int) -> str:
    """The token for the page after one holding `ids` (newest first); "" after the last."""
    return str(ids[-1]) if ids and len(ids) >= page_size else ""
