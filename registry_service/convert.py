"""Conversions between the registry core's records and the `modelyard.v1` messages: tables
plus pure functions, the servicer's only encoding and decoding."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from modelyard.v1 import registry_pb2, registry_service_pb2
from registry_service.records import (
    AliasChange,
    AliasRecord,
    ArtifactFormat,
    ModelRecord,
    UploadMetadata,
    VersionRecord,
    VersionState,
)

__all__ = [
    "FORMAT_TO_PROTO",
    "FORMAT_FROM_PROTO",
    "STATE_TO_PROTO",
    "timestamp",
    "alias_to_proto",
    "model_to_proto",
    "version_to_proto",
    "upload_metadata_from_proto",
    "set_alias_response",
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
    )


def set_alias_response(change: AliasChange) -> registry_service_pb2.SetAliasResponse:
    return registry_service_pb2.SetAliasResponse(
        alias=alias_to_proto(change.alias),
        previous_version=change.previous_version,
        epoch=change.epoch,
    )
