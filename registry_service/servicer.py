"""The registry's gRPC adapter: decode, one call into `registry.Registry`, encode.

Every method wears `@rpc_errors`, which turns the core's domain errors into statuses. Every
mutating method also records an audit entry (who, what, when, request id, outcome, failures
included) through `audited`. Who is the authenticated principal (`modelyard.access`), never a
field or header the caller fills in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from modelyard.access import current_principal, visible
from modelyard.errors import InvalidArgument, ModelyardError
from modelyard.rpc.client_name import claimed_name
from modelyard.rpc.context import current_request_id
from modelyard.rpc.errors import rpc_errors, status_code_for
from modelyard.v1 import registry_pb2, registry_service_pb2_grpc
from modelyard.v1 import registry_service_pb2 as pb
from registry_service import convert
from registry_service.deployments import deployment_diff
from registry_service.records import AuditFilter, AuditRecord, MoveKind
from registry_service.registry import Registry, resolve_page_size

__all__ = ["RegistryServicer", "SERVICE_NAME", "audited", "actor_of"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
"""The full name of the service ("modelyard.v1.RegistryService"), for health and reflection."""

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_EXPORT_CHUNK_BYTES = 1024 * 1024


@dataclasses.dataclass
class _Audit:
    """What an audited call fills in as it learns it."""

    actor: str
    request_id: str
    model: str
    target: str
    message: str = ""


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """`modelyard.v1.RegistryService` over a `Registry`."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    @rpc_errors
    async def CreateModel(self, request: pb.CreateModelRequest, context: _Context) -> pb.CreateModelResponse:
        async with audited(self._registry, context, "CreateModel", request.name, "model", request.request_id):
            model = await self._registry.create_model(
                request.name,
                request.description,
                request_id=request.request_id,
                require_signature=request.require_signature,
            )
        return pb.CreateModelResponse(model=convert.model_to_proto(model))

    @rpc_errors
    async def GetModel(self, request: pb.GetModelRequest, context: _Context) -> pb.GetModelResponse:
        model = await self._registry.get_model(request.name)
        return pb.GetModelResponse(model=convert.model_to_proto(model))

    @rpc_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: _Context) -> pb.ListModelsResponse:
        models = await self._registry.list_models()
        # A key sees only the models its grants cover.
        return pb.ListModelsResponse(
            models=[convert.model_to_proto(m) for m in models if visible("registry.read", m.name)]
        )

    @rpc_errors
    async def UploadModelVersion(
        self, request_iterator: AsyncIterator[pb.UploadModelVersionRequest], context: _Context
    ) -> pb.UploadModelVersionResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("content") != "metadata":
            raise InvalidArgument(
                "the first message of an upload must carry the metadata, the next ones the bytes",
                field="metadata",
            )
        metadata = first.metadata
        async with audited(
            self._registry, context, "UploadModelVersion", metadata.model, "new version", metadata.request_id
        ) as audit:
            version = await self._registry.upload_version(
                convert.upload_metadata_from_proto(metadata), _chunks(request_iterator), actor=audit.actor
            )
            audit.target = f"version {version.version}"
            audit.message = (
                f"sha256 {version.sha256}, {version.size_bytes} bytes; "
                + (f"signed by {version.signer}" if version.signer else "unsigned")
                + _baseline_summary(version.input_baselines)
            )
        return pb.UploadModelVersionResponse(model_version=convert.version_to_proto(version))

    @rpc_errors
    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: _Context
    ) -> pb.GetModelVersionResponse:
        version = await self._registry.get_version(request.model, request.version)
        return pb.GetModelVersionResponse(model_version=convert.version_to_proto(version))

    @rpc_errors
    async def RecordOptimizationReports(
        self, request: pb.RecordOptimizationReportsRequest, context: _Context
    ) -> pb.RecordOptimizationReportsResponse:
        target = f"version {request.version} optimization reports"
        async with audited(
            self._registry, context, "RecordOptimizationReports", request.model, target, request.request_id
        ) as audit:
            version = await self._registry.record_optimization_reports(
                request.model, request.version, tuple(request.reports)
            )
            audit.message = ", ".join(
                f"{r.optimization}/{r.precision}/{r.device}" for r in request.reports[:16]
            )
        return pb.RecordOptimizationReportsResponse(model_version=convert.version_to_proto(version))

    @rpc_errors
    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: _Context
    ) -> pb.ListModelVersionsResponse:
        versions = await self._registry.list_versions(request.model)
        return pb.ListModelVersionsResponse(model_versions=[convert.version_to_proto(v) for v in versions])

    @rpc_errors
    async def DownloadModelVersion(
        self, request: pb.DownloadModelVersionRequest, context: _Context
    ) -> AsyncIterator[pb.DownloadModelVersionResponse]:
        version, chunks = await self._registry.download(request.model, request.version)
        first = True
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if first:
                    # The first message also carries the whole artifact's hash and size.
                    yield pb.DownloadModelVersionResponse(
                        chunk=chunk, sha256=version.sha256, size_bytes=version.size_bytes
                    )
                    first = False
                else:
                    yield pb.DownloadModelVersionResponse(chunk=chunk)

    @rpc_errors
    async def SetAlias(self, request: pb.SetAliasRequest, context: _Context) -> pb.SetAliasResponse:
        target = f"alias {request.alias} -> {request.version}"
        async with audited(
            self._registry, context, "SetAlias", request.model, target, request.request_id
        ) as audit:
            kind = convert.move_kind_from_proto(request.kind)
            change = await self._registry.set_alias(
                request.model,
                request.alias,
                request.version,
                expected_version=(request.expected_version if request.HasField("expected_version") else None),
                expected_epoch=(request.expected_epoch if request.HasField("expected_epoch") else None),
                reason=request.reason,
                actor=audit.actor,
                request_id=audit.request_id,
                kind=kind,
            )
            audit.message = _moved(
                change.previous_version, change.alias.version, change.epoch, change.changed
            )
            if kind not in (MoveKind.UNSPECIFIED, MoveKind.SET):
                audit.message += f"; declared a {kind.value.replace('_', ' ')}"
        return convert.set_alias_response(change)

    @rpc_errors
    async def RollbackAlias(
        self, request: pb.RollbackAliasRequest, context: _Context
    ) -> pb.RollbackAliasResponse:
        target = f"alias {request.alias}"
        async with audited(
            self._registry, context, "RollbackAlias", request.model, target, request.request_id
        ) as audit:
            change = await self._registry.rollback_alias(
                request.model,
                request.alias,
                expected_version=(request.expected_version if request.HasField("expected_version") else None),
                reason=request.reason,
                actor=audit.actor,
                request_id=audit.request_id,
            )
            audit.message = _moved(
                change.previous_version, change.alias.version, change.epoch, change.changed
            )
        return pb.RollbackAliasResponse(
            alias=convert.alias_to_proto(change.alias),
            previous_version=change.previous_version,
            epoch=change.epoch,
        )

    @rpc_errors
    async def ListAliasHistory(
        self, request: pb.ListAliasHistoryRequest, context: _Context
    ) -> pb.ListAliasHistoryResponse:
        page_size = resolve_page_size(request.page_size)
        entries = await self._registry.list_alias_history(
            request.model,
            request.alias,
            page_size=page_size,
            before_id=convert.page_token_to_id(request.page_token),
            kind=(convert.move_kind_from_proto(request.kind) if request.kind else None),
        )
        return pb.ListAliasHistoryResponse(
            entries=[convert.history_entry_to_proto(e) for e in entries],
            next_page_token=convert.next_page_token([e.id for e in entries], page_size),
        )

    @rpc_errors
    async def PromoteVersion(
        self, request: pb.PromoteVersionRequest, context: _Context
    ) -> pb.PromoteVersionResponse:
        target = f"alias {request.alias} -> {request.version}"
        async with audited(
            self._registry, context, "PromoteVersion", request.model, target, request.request_id
        ) as audit:
            outcome = await self._registry.promote(
                request.model,
                request.alias,
                request.version,
                expected_version=(request.expected_version if request.HasField("expected_version") else None),
                ready_timeout_s=(
                    request.ready_timeout.ToTimedelta().total_seconds()
                    if request.HasField("ready_timeout")
                    else None
                ),
                reason=request.reason,
                actor=audit.actor,
                request_id=audit.request_id,
            )
            change = outcome.change
            audit.message = (
                _moved(change.previous_version, change.alias.version, change.epoch, change.changed)
                + f"; ready on {outcome.ready_replicas} model server(s)"
            )
        return pb.PromoteVersionResponse(
            alias=convert.alias_to_proto(change.alias),
            previous_version=change.previous_version,
            epoch=change.epoch,
            ready_replicas=outcome.ready_replicas,
        )

    @rpc_errors
    async def SetDeployment(
        self, request: pb.SetDeploymentRequest, context: _Context
    ) -> pb.SetDeploymentResponse:
        spec = convert.deployment_spec_from_proto(request.deployment)
        paths = list(request.update_mask.paths)
        target = "deployment" + (f" [{', '.join(p[:40] for p in paths[:16])}]" if paths else "")
        async with audited(
            self._registry, context, "SetDeployment", request.model, target, request.request_id
        ) as audit:
            change = await self._registry.set_deployment(
                request.model,
                spec,
                expected_epoch=request.expected_epoch,
                update_mask=paths,
                actor=audit.actor,
                skip_proof=request.skip_proof,
            )
            state = change.state
            audit.message = (
                f"{deployment_diff(change.previous, state.spec)}; placed versions "
                f"{list(state.placed_versions)} (epoch {state.epoch})"
            )
        return pb.SetDeploymentResponse(deployment=convert.deployment_to_proto(state))

    @rpc_errors
    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: _Context
    ) -> pb.GetDeploymentResponse:
        state = await self._registry.get_deployment(request.model)
        return pb.GetDeploymentResponse(deployment=convert.deployment_to_proto(state))

    @rpc_errors
    async def ArchiveModelVersion(
        self, request: pb.ArchiveModelVersionRequest, context: _Context
    ) -> pb.ArchiveModelVersionResponse:
        target = f"version {request.version}"
        async with audited(
            self._registry, context, "ArchiveModelVersion", request.model, target, request.request_id
        ):
            version = await self._registry.archive_version(request.model, request.version)
        return pb.ArchiveModelVersionResponse(model_version=convert.version_to_proto(version))

    @rpc_errors
    async def DeleteModelVersion(
        self, request: pb.DeleteModelVersionRequest, context: _Context
    ) -> pb.DeleteModelVersionResponse:
        target = f"version {request.version}"
        async with audited(
            self._registry, context, "DeleteModelVersion", request.model, target, request.request_id
        ) as audit:
            artifact_deleted = await self._registry.delete_version(request.model, request.version)
            audit.message = (
                "artifact deleted" if artifact_deleted else "artifact kept: another version shares it"
            )
        return pb.DeleteModelVersionResponse(artifact_deleted=artifact_deleted)

    @rpc_errors
    async def ListAuditEntries(
        self, request: pb.ListAuditEntriesRequest, context: _Context
    ) -> pb.ListAuditEntriesResponse:
        page_size = resolve_page_size(request.page_size)
        where = AuditFilter(
            model=request.model,
            actor=request.actor,
            method=request.method,
            outcome=request.outcome,
            start_time=(request.start_time.ToNanoseconds() / 1e9 if request.HasField("start_time") else 0.0),
        )
        entries = await self._registry.list_audit(
            where, page_size=page_size, before_id=convert.page_token_to_id(request.page_token)
        )
        return pb.ListAuditEntriesResponse(
            entries=[convert.audit_to_proto(e) for e in entries],
            next_page_token=convert.next_page_token([e.id for e in entries], page_size),
        )

    @rpc_errors
    async def ExportModel(
        self, request: pb.ExportModelRequest, context: _Context
    ) -> AsyncIterator[pb.ExportModelResponse]:
        # Audited although it changes nothing: it takes a model's artifacts out of the cluster.
        async with audited(self._registry, context, "ExportModel", request.model, "bundle", "") as audit:
            manifest, chunks = await self._registry.export_model(
                request.model, list(request.versions), list(request.aliases)
            )
            sent = 0
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    sent += len(chunk)
                    # The manifest's member may be larger than a message should be.
                    for start in range(0, len(chunk), _EXPORT_CHUNK_BYTES):
                        yield pb.ExportModelResponse(chunk=chunk[start : start + _EXPORT_CHUNK_BYTES])
            audit.message = (
                f"versions {[v.version for v in manifest.versions]}, aliases "
                f"{[a.name for a in manifest.aliases]}, {sent} bytes"
            )

    @rpc_errors
    async def ImportModel(
        self, request_iterator: AsyncIterator[pb.ImportModelRequest], context: _Context
    ) -> pb.ImportModelResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("content") != "options":
            raise InvalidArgument(
                "the first message of an import must carry the options, the next ones the bundle",
                field="options",
            )
        options = first.options
        # The model is known only once the manifest is read; the audit entry learns it then.
        async with audited(self._registry, context, "ImportModel", "", "bundle", options.request_id) as audit:
            outcome = await self._registry.import_model(
                _import_chunks(request_iterator), with_aliases=options.with_aliases, actor=audit.actor
            )
            audit.model = outcome.manifest.model
            audit.message = (
                f"from cluster {outcome.manifest.source_cluster}, {outcome.bytes_read} bytes: "
                + ", ".join(
                    f"v{v.source_version} -> v{v.version.version}{'' if v.created else ' (already here)'}"
                    for v in outcome.versions
                )
                + "".join(f"; alias {a.alias} -> {a.version} ({a.moved_by})" for a in outcome.aliases)
            )
        return convert.import_outcome_to_proto(outcome)


@contextlib.asynccontextmanager
async def audited(
    registry: Registry, context: _Context, method: str, model: str, target: str, request_id: str
) -> AsyncIterator[_Audit]:
    """Record the call in the audit log when the block ends, with its outcome."""
    audit = _Audit(
        actor=actor_of(context),
        request_id=request_id or current_request_id(),
        model=model,
        target=target,
    )
    started = time.time()

    async def record(outcome: str, reason: str = "", message: str = "") -> None:
        await registry.record_audit(
            AuditRecord(
                time=started,
                actor=audit.actor,
                method=method,
                model=audit.model,
                target=audit.target,
                request_id=audit.request_id,
                outcome=outcome,
                error_reason=reason,
                message=message,
            )
        )

    try:
        yield audit
    except ModelyardError as exc:
        await record(status_code_for(exc).name, exc.reason, exc.message)
        raise
    except asyncio.CancelledError:
        # The caller went away; what the call did is still worth a line. Shielded, so the
        # cancellation being delivered does not also cancel the write.
        await asyncio.shield(record("CANCELLED", "", "the caller cancelled the call"))
        raise
    except Exception:
        # The details stay in the log (rpc_errors logs them with the request id).
        await record("INTERNAL", "INTERNAL", "internal error")
        raise
    await record("OK", "", audit.message)


def actor_of(context: _Context) -> str:
    """The audit log's actor: the authenticated principal. With access control off nobody is
    authenticated, and the entry says so, with the peer's address and the name the client
    claims in its user-agent, if any (`modelyard.rpc.client_name`), labelled as a claim."""
    principal = current_principal()
    if principal is not None:
        return principal.name
    peer = context.peer() or "an unknown peer"
    name = claimed_name(context.invocation_metadata())
    if name is not None:
        return f"{name} (claimed; access control off) at {peer}"
    return f"anonymous (access control off) at {peer}"


def _baseline_summary(baselines: tuple[registry_pb2.InputBaseline, ...]) -> str:
    """The input baseline recorded with a version, in a few words for the audit log."""
    if not baselines:
        return "; no input baseline"
    described = ", ".join(
        f"{b.input} ({len(b.features)} features, {b.item_count} items, "
        f"{max((len(f.bin_fractions) for f in b.features), default=0)} bins)"
        for b in baselines
    )
    return f"; input baseline: {described}"


def _moved(previous: int, version: int, epoch: int, changed: bool) -> str:
    if not changed:
        return f"already at version {version} (epoch {epoch}); nothing moved"
    return f"version {previous or 'none'} -> {version} (epoch {epoch})"


async def _chunks(request_iterator: AsyncIterator[pb.UploadModelVersionRequest]) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        if message.WhichOneof("content") == "metadata":
            raise InvalidArgument(
                "an upload carries its metadata in the first message only", field="metadata"
            )
        if message.chunk:
            yield message.chunk


async def _import_chunks(request_iterator: AsyncIterator[pb.ImportModelRequest]) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        if message.WhichOneof("content") == "options":
            raise InvalidArgument("an import carries its options in the first message only", field="options")
        if message.chunk:
            yield message.chunk
