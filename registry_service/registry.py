"""The registry core: models, versions, artifacts and aliases, with no gRPC in sight.

SQLite (`db.Database`, its rules in `rules`) is the source of truth and the artifact directory
(`artifacts.ArtifactStore`) holds the bytes; Redis gets a live copy of each model's aliases,
written whole with the model's epoch so that a late or replayed write never moves a pointer
back. If Redis is down when an alias moves, the move still stands (it is committed) and
`resync_forever` pushes it once Redis is back; the same loop repairs a flushed or replaced
Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Protocol

from modelyard.baseline import MAX_BIN_EDGES, MAX_FEATURES
from modelyard.coordination import Deployment, ServiceRecord
from modelyard.errors import (
    ArtifactCorrupt,
    Conflict,
    CoordinationUnavailable,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ModelyardError,
)
from modelyard.model_signatures import SignaturePolicy, SignatureVerifier
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service import migration, rules, store_aliases, store_audit, store_deployments, store_models
from registry_service.artifacts import SHA256_PATTERN, ArtifactStore, StagedArtifact
from registry_service.bundle import Manifest
from registry_service.db import Database
from registry_service.deployments import (
    apply_update_mask,
    check_deployment,
    check_update_mask,
    deployment_diff,
    live_deployment,
)
from registry_service.formats import check_archive
from registry_service.proof import beyond_tolerance, figures_text, missing_baselines, needs_proof
from registry_service.records import (
    AliasChange,
    AuditFilter,
    AuditRecord,
    DeploymentChange,
    DeploymentSpec,
    HistoryEntry,
    ImportItem,
    ModelRecord,
    MoveKind,
    RoutingState,
    UploadMetadata,
    VersionRecord,
    VersionState,
    check_name,
)

__all__ = ["AliasSink", "Registry", "PromoteOutcome", "resolve_page_size"]

log = logging.getLogger(__name__)

_KNOWN_DATA_TYPES = frozenset(tensor_pb2.DataType.values()) - {tensor_pb2.DATA_TYPE_UNSPECIFIED}

SET_ALIAS_KINDS = frozenset(
    {MoveKind.SET, MoveKind.ROLLBACK, MoveKind.CANARY_PROMOTE, MoveKind.CANARY_ROLLBACK}
)
"""What a SetAlias may declare its move to be; PROMOTE is only what PromoteVersion records
(it waits for readiness, a SetAlias does not)."""


class AliasSink(Protocol):
    """Where alias maps and deployments go live, and where model servers report what they hold:
    `modelyard.coordination.CoordinationStore` in production."""

    async def apply_aliases(
        self, model: str, aliases: dict[str, int], epoch: int, deployment: Deployment | None = None
    ) -> bool:
        """Replace the model's alias map and deployment if `epoch` is newer; False if not."""
        ...

    async def routing_snapshot(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], int]], dict[str, Deployment], list[ServiceRecord]]:
        """Every model's live alias map and epoch, its deployment, and every live service,
        read at one instant (a resync comparing a torn read would take a FLUSHALL in between
        for a Redis ahead of the registry, and bump the epoch for nothing)."""
        ...

    async def list_services(self) -> list[ServiceRecord]:
        """Every live service's membership record."""
        ...


class Prover(Protocol):
    """Measures a version under a new deployment setting before the registry stores it:
    `registry_service.proof.ModelServerProver` (a model server, over gRPC) in production."""

    async def choose(self, device: str) -> ServiceRecord:
        """The model server that will measure on `device`; FailedPrecondition if none can."""
        ...

    async def measure(
        self, server: ServiceRecord, model: str, version: int, spec: DeploymentSpec
    ) -> registry_pb2.OptimizationReport:
        """One version under `spec`'s device, precision and optimisation against fp32 eager
        on the CPU, on its baseline sample; Unavailable when the server does not answer."""
        ...


PROOF_ATTEMPTS = 3
"""How many times a SetDeployment without `expected_epoch` proves again when the model's
routing moved while its versions were being measured (an alias moved, say) before it gives
up with ABORTED."""


@dataclasses.dataclass(frozen=True, slots=True)
class PromoteOutcome:
    """What a promote did: the alias move, and how many replicas were ready before it."""

    change: AliasChange
    ready_replicas: int


class Registry:
    """What the registry does, for any transport.

    Args:
        db: The metadata database (opened).
        artifacts: The artifact directory (opened).
        aliases: Where alias maps go live (Redis).
        max_artifact_bytes: Largest artifact an upload may carry.
        download_chunk_bytes: Size of the chunks `download` yields.
        signatures: Whom to trust for model signatures, and whether every version needs one;
            unset trusts no one (a signed upload is refused, an unsigned one accepted unless
            its model requires a signature).
        prover: Proves a device, precision or optimisation change on a model server before
            `set_deployment` stores it; unset: such a change is stored unproven (the model
            servers' load-time gate is then the only check).

    Usage::

        registry = Registry(db, artifacts, coordination, max_artifact_bytes=2**31,
                            download_chunk_bytes=2**20)
        await registry.create_model("demo", "an MLP")
        version = await registry.upload_version(metadata, chunks)
        await registry.set_alias("demo", "production", version.version, expected_version=0)
    """

    def __init__(
        self,
        db: Database,
        artifacts: ArtifactStore,
        aliases: AliasSink,
        *,
        max_artifact_bytes: int,
        download_chunk_bytes: int,
        retention_s: float = 600.0,
        promote_timeout_s: float = 120.0,
        ready_poll_interval_s: float = 0.1,
        clock: Callable[[], float] = time.time,
        signatures: SignaturePolicy | None = None,
        prover: Prover | None = None,
    ) -> None:
        self._signatures = signatures or SignaturePolicy(SignatureVerifier())
        self._prover = prover
        self._db = db
        self._artifacts = artifacts
        self._aliases = aliases
        self._max_artifact_bytes = max_artifact_bytes
        self._download_chunk_bytes = download_chunk_bytes
        self._retention_s = retention_s
        self._promote_timeout_s = promote_timeout_s
        self._ready_poll_interval_s = ready_poll_interval_s
        self._clock = clock
        # An upload and a delete of the same content take its lock, so a delete can never
        # remove a file that an upload has just found in place (dedup) and is about to record.
        self._content_locks: dict[str, asyncio.Lock] = {}
        self._holds_changed = asyncio.Event()

    # -- models ----------------------------------------------------------------------------

    async def create_model(
        self, name: str, description: str = "", *, request_id: str = "", require_signature: bool = False
    ) -> ModelRecord:
        """Create an empty model; with `require_signature`, every version of it must carry a
        model signature by a trusted signer.

        Raises:
            InvalidArgument: the name breaks the naming rule.
            AlreadyExists: the name is taken (a retry with the same request id returns the model).
        """
        check_name(name, field="name", what="model")
        return await self._db.run(
            store_models.create_model,
            name,
            description,
            request_id=request_id,
            require_signature=require_signature,
        )

    async def get_model(self, name: str) -> ModelRecord:
        """A model with its aliases. Raises InvalidArgument or ModelNotFound."""
        check_name(name, field="name", what="model")
        return await self._db.read(store_models.get_model, name)

    async def list_models(self) -> list[ModelRecord]:
        """Every model with its aliases, sorted by name."""
        return await self._db.read(store_models.list_models)

    # -- versions --------------------------------------------------------------------------

    async def upload_version(
        self, metadata: UploadMetadata, chunks: AsyncIterator[bytes], *, actor: str = ""
    ) -> VersionRecord:
        """Store a new version: check the metadata and the model signature, store the artifact
        (hashed and statically inspected on the way), then record the version.

        The artifact goes first and the row second, so a crash in between leaves at worst an
        unreferenced file, never a version without its bytes. Nothing of `chunks` is read if
        the metadata or the signature is refused: the signature signs the declared sha256,
        which the bytes are then held to.

        Args:
            metadata: What the uploader says about the artifact.
            chunks: The artifact's bytes.
            actor: Who uploads (recorded as `created_by`).

        Raises:
            InvalidArgument: bad name, format, sha256, signature or input baseline, no bytes,
                or an archive that is not of the stated format (the field at fault is named).
            UnsafeArtifact: the archive holds a part loading could unpickle or execute, a path
                outside it, or more than its limits (the member is named).
            ModelSignatureInvalid: the model signature does not verify, or is missing where
                the model (or the cluster) requires one.
            ModelNotFound: the model does not exist.
            ChecksumMismatch: the bytes do not hash to `metadata.sha256`.
            TooLarge: the artifact is over the limit.
        """
        check_name(metadata.model, field="metadata.model", what="model")
        fmt = metadata.format
        if fmt is None:
            raise InvalidArgument(
                "metadata.format is unset or unknown; set ARTIFACT_FORMAT_TORCHSCRIPT or "
                "ARTIFACT_FORMAT_TORCH_EXPORT",
                field="metadata.format",
            )
        sha256 = metadata.sha256.lower()
        if SHA256_PATTERN.fullmatch(sha256) is None:
            raise InvalidArgument(
                "metadata.sha256 must be the artifact's sha256 as 64 hex digits",
                field="metadata.sha256",
            )
        _check_signature(metadata.signature)
        _check_metrics(metadata.metrics)
        _check_baselines(metadata.input_baselines, metadata.signature)
        # Refuse an unknown model, and a missing or bad signature, before any byte is read.
        model = await self._db.read(store_models.get_model, metadata.model)
        signer = await asyncio.to_thread(
            self._signatures.check,
            metadata.model_signature,
            sha256=sha256,
            required=model.require_signature,
            field="metadata.model_signature",
        )
        async with self._content_lock(sha256):
            stored_sha256, size = await self._artifacts.write(
                chunks,
                expected_sha256=sha256,
                max_bytes=self._max_artifact_bytes,
                check=lambda path: check_archive(path, fmt),
            )
            version = await self._db.run(
                store_models.insert_version,
                dataclasses.replace(metadata, sha256=stored_sha256),
                sha256=stored_sha256,
                size_bytes=size,
                created_by=actor,
                signer=signer,
            )
        log.info(
            "stored version %d of model %r (%d bytes, sha256 %s)",
            version.version,
            version.model,
            size,
            stored_sha256,
        )
        return version

    async def get_version(self, model: str, version: int) -> VersionRecord:
        """One version's metadata. Raises InvalidArgument, ModelNotFound or VersionNotFound."""
        _check_version_ref(model, version)
        return await self._db.read(store_models.get_version, model, version)

    async def record_optimization_reports(
        self, model: str, version: int, reports: tuple[registry_pb2.OptimizationReport, ...]
    ) -> VersionRecord:
        """Store measured optimisation reports with a version (see `store_models`).

        Raises:
            InvalidArgument: a report names no profile or device, or two name the same one.
            ModelNotFound, VersionNotFound: as `get_version`.
        """
        _check_version_ref(model, version)
        seen: set[tuple[str, str, str]] = set()
        for i, report in enumerate(reports):
            key = (report.optimization, report.precision, report.device)
            if not report.optimization or not report.device or not report.precision:
                raise InvalidArgument(
                    "a report names its optimization, precision and device", field=f"reports[{i}]"
                )
            if key in seen:
                raise InvalidArgument(f"two reports are for {key}", field=f"reports[{i}]")
            seen.add(key)
        return await self._db.run(store_models.record_optimization_reports, model, version, reports)

    async def list_versions(self, model: str) -> list[VersionRecord]:
        """A model's versions, oldest first. Raises InvalidArgument or ModelNotFound."""
        check_name(model, field="model", what="model")
        return await self._db.read(store_models.list_versions, model)

    async def download(self, model: str, version: int) -> tuple[VersionRecord, AsyncGenerator[bytes, None]]:
        """A version's metadata and its artifact's bytes.

        The bytes are verified against the recorded sha256 before the first chunk is yielded;
        a damaged or missing file raises ArtifactCorrupt from the iterator instead.

        Raises:
            InvalidArgument, ModelNotFound, VersionNotFound: as `get_version`.
            FailedPrecondition: the version is archived.
        """
        record = await self.get_version(model, version)
        if record.state is not VersionState.ACTIVE:
            raise FailedPrecondition(
                f"version {version} of model {model!r} is {record.state.value} and is not served",
                field="version",
            )
        return record, self._verified_chunks(record)

    async def _verified_chunks(self, record: VersionRecord) -> AsyncGenerator[bytes, None]:
        chunks = self._artifacts.read_verified(record.sha256, self._download_chunk_bytes)
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    yield chunk
            except ArtifactCorrupt as exc:
                log.error("refusing to serve version %d of model %r: %s", record.version, record.model, exc)
                raise ArtifactCorrupt(
                    f"the stored artifact of version {record.version} of model {record.model!r} "
                    "is damaged or missing and is not served; upload the same artifact again "
                    "(it replaces the damaged copy) or restore it from backup",
                    metadata={"model": record.model, "version": str(record.version), **exc.metadata},
                ) from exc

    # -- migration -------------------------------------------------------------------------

    @property
    def cluster_id(self) -> str:
        """This registry's stable identity, which bundles it exports name as their source."""
        return self._db.cluster_id

    async def export_model(
        self, model: str, versions: Sequence[int] = (), aliases: Sequence[str] = ()
    ) -> tuple[Manifest, AsyncGenerator[bytes, None]]:
        """A model's migration bundle (`migration.export_bundle`)."""
        return await migration.export_bundle(self, model, versions, aliases)

    async def import_model(
        self, chunks: AsyncIterator[bytes], *, with_aliases: bool = False, actor: str = ""
    ) -> migration.ImportOutcome:
        """Import a migration bundle, all or nothing (`migration.import_bundle`)."""
        return await migration.import_bundle(self, chunks, with_aliases=with_aliases, actor=actor)

    def artifact_chunks(self, sha256: str) -> AsyncGenerator[bytes, None]:
        """A stored artifact's bytes, verified against its hash before the first chunk."""
        return self._artifacts.read_verified(sha256, self._download_chunk_bytes)

    async def verify_signature(self, bundle: bytes, *, sha256: str, required: bool, field: str) -> str:
        """The signer of a model signature over `sha256`, as an upload verifies it ("" if none)."""
        return await asyncio.to_thread(
            self._signatures.check, bundle, sha256=sha256, required=required, field=field
        )

    async def stage_artifact(
        self, chunks: AsyncIterator[bytes], *, expected_sha256: str, check: Callable[[Path], None]
    ) -> StagedArtifact:
        """Write, hash and check an artifact as an upload does, without storing it yet."""
        return await self._artifacts.stage(
            chunks, expected_sha256=expected_sha256, max_bytes=self._max_artifact_bytes, check=check
        )

    async def discard_staged(self, staged: StagedArtifact) -> None:
        """Drop a staged artifact."""
        await self._artifacts.discard(staged)

    async def commit_import(
        self,
        model: ModelRecord,
        items: Sequence[ImportItem],
        staged: Sequence[StagedArtifact],
        *,
        actor: str,
    ) -> list[tuple[VersionRecord, bool]]:
        """Store the staged artifacts, then record every imported version in one transaction.

        As in an upload, the files go first and the rows second (a crash in between leaves
        unreferenced files, never a version without its bytes), under the content locks so a
        concurrent delete cannot remove a file about to be referenced.
        """
        async with contextlib.AsyncExitStack() as locks:
            for sha256 in sorted({a.sha256 for a in staged}):
                await locks.enter_async_context(self._content_lock(sha256))
            for artifact in staged:
                await self._artifacts.install(artifact)
            return await self._db.run(store_models.import_versions, model, items, created_by=actor)

    async def move_imported_alias(
        self, model: str, alias: str, version: int, *, reason: str, actor: str
    ) -> migration.AliasOutcome:
        """Point an alias at an imported version: by the zero-downtime promote when a model
        server runs here to make it ready, else with SetAlias semantics (nothing would ever
        report it ready, and a registry-only cluster serves nothing anyway)."""
        current = (await self._db.read(rules.routing_state, model)).aliases.get(alias, 0)
        if current == version:
            return migration.AliasOutcome(alias, version, "unchanged", current)
        try:
            servers = [
                s for s in await self._aliases.list_services() if s.kind == "model_server" and not s.draining
            ]
        except CoordinationUnavailable:
            servers = []
        if servers:
            outcome = await self.promote(model, alias, version, reason=reason, actor=actor)
            return migration.AliasOutcome(alias, version, "promote", outcome.change.previous_version)
        change = await self.set_alias(model, alias, version, reason=reason, actor=actor, kind=MoveKind.SET)
        return migration.AliasOutcome(alias, version, "set", change.previous_version)

    # -- aliases ---------------------------------------------------------------------------

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        expected_epoch: int | None = None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
        kind: MoveKind = MoveKind.SET,
    ) -> AliasChange:
        """Point an alias at a version (compare-and-set), record the move, and publish it.

        Args:
            expected_version: What the alias must point at now; 0 means it must not exist yet;
                None moves it whatever it points at.
            expected_epoch: What the model's routing epoch must be now; None: no check.
            kind: What the move is, for the history (UNSPECIFIED: SET); one of
                `SET_ALIAS_KINDS`.

        Raises:
            InvalidArgument: bad names or numbers, or a kind a SetAlias may not declare.
            ModelNotFound / VersionNotFound: unknown model or version.
            FailedPrecondition: the version is archived.
            Conflict: the alias or the model's routing moved since the caller read it (ABORTED).
        """
        _check_version_ref(model, version)
        check_name(alias, field="alias", what="alias")
        if expected_version is not None and expected_version < 0:
            raise InvalidArgument(
                "expected_version must be 0 (the alias must not exist) or a version number",
                field="expected_version",
            )
        if expected_epoch is not None and expected_epoch < 0:
            raise InvalidArgument(
                f"expected_epoch must be an epoch (0 or more), got {expected_epoch}",
                field="expected_epoch",
            )
        kind = MoveKind.SET if kind is MoveKind.UNSPECIFIED else kind
        if kind not in SET_ALIAS_KINDS:
            raise InvalidArgument(
                f"a SetAlias cannot be of kind {kind.name}: that is what PromoteVersion records "
                "(it waits until the version is ready); declare SET, ROLLBACK, CANARY_PROMOTE "
                "or CANARY_ROLLBACK, or call PromoteVersion",
                field="kind",
            )
        return await self._set_alias(
            model,
            alias,
            version,
            expected_version=expected_version,
            expected_epoch=expected_epoch,
            reason=reason,
            actor=actor,
            request_id=request_id,
            kind=kind,
        )

    async def _set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None,
        expected_epoch: int | None,
        reason: str,
        actor: str,
        request_id: str,
        kind: MoveKind,
    ) -> AliasChange:
        change = await self._db.run(
            rules.set_alias,
            model,
            alias,
            version,
            expected_version=expected_version,
            expected_epoch=expected_epoch,
            reason=reason,
            actor=actor,
            request_id=request_id,
            kind=kind,
            retention_s=self._retention_s,
        )
        if change.changed:
            log.info(
                "alias %r of model %r: version %d -> %d (epoch %d, %s by %s)",
                alias,
                model,
                change.previous_version,
                version,
                change.epoch,
                kind.value,
                actor or "-",
            )
            assert change.state is not None
            await self._publish(change.state)
            self._holds_changed.set()
        return change

    async def rollback_alias(
        self,
        model: str,
        alias: str,
        *,
        expected_version: int | None = None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
    ) -> AliasChange:
        """Point an alias back at its previous target (compare-and-set, in one transaction).

        The previous target is still placed for `retention_s` after the move, so within that
        window the rollback is instant: no load, the model servers already hold it warm.

        Raises:
            InvalidArgument: bad names or numbers.
            ModelNotFound / AliasNotFound: unknown model or alias.
            Conflict: `expected_version` is set and the alias moved (ABORTED).
            FailedPrecondition: no earlier target, or it is archived or deleted.
        """
        check_name(model, field="model", what="model")
        check_name(alias, field="alias", what="alias")
        change = await self._db.run(
            rules.rollback_alias,
            model,
            alias,
            expected_version=expected_version,
            reason=reason,
            actor=actor,
            request_id=request_id,
            retention_s=self._retention_s,
        )
        if change.changed:
            log.info(
                "alias %r of model %r rolled back: version %d -> %d (epoch %d)",
                alias,
                model,
                change.previous_version,
                change.alias.version,
                change.epoch,
            )
            assert change.state is not None
            await self._publish(change.state)
            self._holds_changed.set()
        return change

    async def list_alias_history(
        self,
        model: str,
        alias: str = "",
        *,
        page_size: int = 100,
        before_id: int = 0,
        kind: MoveKind | None = None,
    ) -> list[HistoryEntry]:
        """Moves of a model's aliases (only of `kind` if given), newest first. Raises
        InvalidArgument or ModelNotFound."""
        check_name(model, field="model", what="model")
        if alias:
            check_name(alias, field="alias", what="alias")
        return await self._db.read(
            store_aliases.list_alias_history,
            model,
            alias,
            page_size=resolve_page_size(page_size),
            before_id=before_id,
            kind=kind,
        )

    async def promote(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        ready_timeout_s: float | None = None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
    ) -> PromoteOutcome:
        """Move an alias with zero downtime: place the version, wait until enough model
        servers report it ready, then move the alias (compare-and-set).

        Enough means the deployment's `replicas`, or one when it places on every server (the
        gateway routes only to ready replicas, so one is what serving needs; the others join
        as they finish loading).

        Raises:
            InvalidArgument, ModelNotFound, VersionNotFound: as `set_alias`.
            Conflict: the alias is not at `expected_version` (checked before and at the move).
            DeadlineExceeded: the version was not ready on enough replicas in time.
            FailedPrecondition: the version is archived, or no model server could load it.
        """
        _check_version_ref(model, version)
        check_name(alias, field="alias", what="alias")
        timeout_s = self._promote_timeout_s if ready_timeout_s is None else ready_timeout_s
        if not timeout_s > 0:
            raise InvalidArgument("ready_timeout must be positive", field="ready_timeout")
        before = await self._db.read(rules.routing_state, model)
        current = before.aliases.get(alias, 0)
        if expected_version is not None and expected_version != current:
            # Fail fast: no point loading a version for a move that would lose anyway.
            raise Conflict(
                f"alias {alias!r} of model {model!r} points at version {current}, not "
                f"{expected_version}; re-read it and retry with the new expected_version",
                metadata={"model": model, "alias": alias, "current_version": str(current)},
            )
        state = await self._db.run(
            rules.hold_version,
            model,
            version,
            until=self._clock() + timeout_s + self._retention_s,
            why="promoting",
        )
        await self._publish(state)
        self._holds_changed.set()
        try:
            ready = await self._wait_until_ready(model, version, max(1, state.spec.replicas), timeout_s)
            change = await self._set_alias(
                model,
                alias,
                version,
                expected_version=expected_version,
                expected_epoch=None,
                reason=reason,
                actor=actor,
                request_id=request_id,
                kind=MoveKind.PROMOTE,
            )
        except BaseException:
            # Stop placing a version nobody moved to (a no-op once the alias points at it).
            with contextlib.suppress(ModelyardError):
                released = await self._db.run(rules.release_hold, model, version, why="promoting")
                if released is not None:
                    await self._publish(released)
            raise
        if not change.changed:
            # Nothing moved (already there, or a retried call): the alias keeps it placed.
            released = await self._db.run(rules.release_hold, model, version, why="promoting")
            if released is not None:
                await self._publish(released)
        return PromoteOutcome(change=change, ready_replicas=ready)

    async def _wait_until_ready(self, model: str, version: int, needed: int, timeout_s: float) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            servers = [
                s for s in await self._aliases.list_services() if s.kind == "model_server" and not s.draining
            ]
            held = [v for s in servers for v in s.versions if (v.model, v.version) == (model, version)]
            ready = sum(1 for v in held if v.state == "ready")
            if ready >= needed:
                return ready
            if loop.time() >= deadline:
                break
            await asyncio.sleep(self._ready_poll_interval_s)
        failed = [v.error for v in held if v.state == "failed"]
        if not servers:
            raise FailedPrecondition(
                f"no model server is running, so version {version} of model {model!r} cannot be "
                "made ready; start one, then promote again",
                field="version",
            )
        if failed and not any(v.state == "loading" for v in held):
            raise FailedPrecondition(
                f"version {version} of model {model!r} failed to load: {failed[0]}",
                field="version",
                metadata={"model": model, "version": str(version)},
            )
        raise DeadlineExceeded(
            f"version {version} of model {model!r} was ready on {ready} of the {needed} model "
            f"server(s) needed after {timeout_s:g}s; the alias did not move. Check the model "
            "servers (modelyard top) or promote again with a longer ready_timeout",
            metadata={"model": model, "version": str(version), "ready_replicas": str(ready)},
        )

    # -- deployments -----------------------------------------------------------------------

    async def set_deployment(
        self,
        model: str,
        spec: DeploymentSpec,
        *,
        expected_epoch: int = 0,
        update_mask: Sequence[str] = (),
        actor: str = "",
        skip_proof: bool = False,
    ) -> DeploymentChange:
        """Change a model's deployment and publish it; with `expected_epoch` (non-zero), only
        while the model's routing epoch is still that one (compare-and-set).

        A change of device, precision or optimisation of a model with placed versions, under
        a deployment with a tolerance, is proven first (`_prove`): beyond the tolerance it is
        refused and nothing changes; within it, the reports are stored with the versions.

        Args:
            spec: The new deployment, or the new values of the fields `update_mask` names.
            update_mask: The fields to change (AIP-134 paths, such as "traffic_split"); the
                others keep their values. Empty or ["*"]: replace the whole deployment.
            actor: Who asks (for the log line).
            skip_proof: Store such a change unproven (the operator's explicit opt-out).

        Returns:
            The deployment before the call and the routing state after it.

        Raises:
            InvalidArgument: a field is out of range, or the split or shadow names an unknown
                alias, or the weights do not sum to 100, or `expected_epoch` is negative, or
                the mask names a path that is not a settable field.
            ModelNotFound: unknown model.
            FailedPrecondition: a pinned version is archived; or the proof refused the
                change (beyond the tolerance, a version without a baseline, no model server
                for the device, a setting the version cannot take).
            Unavailable: the proof's model server did not answer in time.
            Conflict: the epoch is not `expected_epoch` any more.
        """
        check_name(model, field="model", what="model")
        if expected_epoch < 0:
            raise InvalidArgument(
                f"expected_epoch must be 0 (no check) or an epoch, got {expected_epoch}",
                field="expected_epoch",
            )
        fields = check_update_mask(update_mask)
        for attempt in range(1, PROOF_ATTEMPTS + 1):
            proven: list[tuple[int, registry_pb2.OptimizationReport]] = []
            at = expected_epoch
            if self._prover is not None and not skip_proof:
                current = await self._db.read(rules.routing_state, model)
                if not expected_epoch or expected_epoch == current.epoch:
                    proven = await self._prove(current, apply_update_mask(current.spec, spec, fields))
                    # Store only the deployment that was proven: a move in between (an alias
                    # to a version not measured) fails the write, and it is proven again.
                    at = current.epoch if proven else expected_epoch
            try:
                change = await self._db.run(
                    rules.set_deployment, model, spec, expected_epoch=at, fields=fields
                )
            except Conflict:
                if expected_epoch or at == expected_epoch or attempt == PROOF_ATTEMPTS:
                    raise
                log.info("routing of model %r moved during the proof; proving again", model)
                continue
            break
        state = change.state
        log.info(
            "deployment of model %r set by %s (epoch %d, placed versions %s): %s",
            model,
            actor or "-",
            state.epoch,
            list(state.placed_versions),
            deployment_diff(change.previous, state.spec),
        )
        await self._publish(state)
        # After the publish: the change is committed, and a failure to keep its proof must
        # not leave it unpublished until the resync.
        for version, report in proven:
            await self._db.run(store_models.record_optimization_reports, model, version, (report,))
        return change

    async def _prove(
        self, current: RoutingState, new: DeploymentSpec
    ) -> list[tuple[int, registry_pb2.OptimizationReport]]:
        """Measure every version `new` would place under its setting, when the change from
        `current` needs it (`proof.needs_proof`); the reports by version, or [] when no
        proof is needed (no setting change, no tolerance, or nothing placed).

        Raises:
            FailedPrecondition: a version has no baseline, no model server can run the
                device, a version cannot take the setting, or a report is beyond the
                tolerance (the message carries the figures; ErrorInfo metadata too).
            Unavailable: a model server did not answer in time.
        """
        assert self._prover is not None
        model = current.model
        targets = sorted({*current.placed_versions, *new.pinned_versions})
        if not targets or not needs_proof(current.spec, new):
            return []
        versions = {v.version: v for v in await self._db.read(store_models.list_versions, model)}
        # The checks the store makes again in its transaction, first, so that a deployment
        # that would be refused anyway costs no measurement.
        check_deployment(
            new, model=model, aliases=current.aliases, versions={n: v.state for n, v in versions.items()}
        )
        for version in targets:
            record = versions.get(version)
            if record is None:  # placed but gone since the listing: VersionNotFound says so
                record = await self._db.read(store_models.get_version, model, version)
            missing = missing_baselines(record)
            if missing:
                raise FailedPrecondition(
                    f"version {version} of model {model!r} has no input baseline for "
                    f"{', '.join(repr(m) for m in missing[:4])}, so the change of device, precision "
                    "or optimization cannot be proven on its real inputs; upload the version with "
                    "its baseline (modelyard models upload --baseline-sample), drop the "
                    "tolerance, or set skip_proof",
                    metadata={"model": model, "version": str(version)},
                )
        server = await self._prover.choose(new.device)
        change = f"{_setting_text(current.spec)} -> {_setting_text(new)}"
        proven = []
        for version in targets:
            report = await self._prover.measure(server, model, version, new)
            if report.error:
                raise FailedPrecondition(
                    f"deployment of model {model!r} not changed: version {version} cannot run "
                    f"{_setting_text(new)}: {report.error}",
                    metadata={"model": model, "version": str(version), "server_id": report.server_id},
                )
            violation = beyond_tolerance(report, new.max_abs_error, new.min_top1_agreement)
            log.info(
                "proof of %s for model %r version %d on %s: %s (%s)",
                change,
                model,
                version,
                report.server_id,
                figures_text(report),
                violation or "within tolerance",
            )
            if violation is not None:
                metadata = {
                    "model": model,
                    "version": str(version),
                    "server_id": report.server_id,
                    "device": report.device,
                    "max_abs_error": f"{report.max_abs_error:.6g}",
                    "max_rel_error": f"{report.max_rel_error:.6g}",
                    "sample_items": str(report.sample_items),
                }
                if report.HasField("top1_agreement"):
                    metadata["top1_agreement"] = f"{report.top1_agreement:.6g}"
                raise FailedPrecondition(
                    f"deployment of model {model!r} not changed: {change} is beyond its tolerance "
                    f"for version {version}: {violation} ({figures_text(report)}, on "
                    f"{report.device} against fp32 eager on the CPU); the current setting keeps "
                    "serving",
                    metadata=metadata,
                )
            proven.append((version, report))
        return proven

    async def get_deployment(self, model: str) -> RoutingState:
        """A model's deployment with the versions placed now. Raises ModelNotFound."""
        check_name(model, field="model", what="model")
        return await self._db.read(rules.routing_state, model)

    # -- lifecycle -------------------------------------------------------------------------

    async def archive_version(self, model: str, version: int) -> VersionRecord:
        """Archive a version: no longer aliasable, servable or placed.

        Raises:
            FailedPrecondition: an alias points at it, or the deployment pins it.
        """
        _check_version_ref(model, version)
        record, state = await self._db.run(rules.archive_version, model, version)
        log.info("archived version %d of model %r", version, model)
        await self._publish(state)
        return record

    async def delete_version(self, model: str, version: int) -> bool:
        """Delete a version, and its artifact unless another version shares the content.

        Returns:
            Whether the artifact file was removed.

        Raises:
            FailedPrecondition: an alias points at it, or the deployment pins it.
        """
        _check_version_ref(model, version)
        record = await self._db.read(store_models.get_version, model, version)
        async with self._content_lock(record.sha256):
            outcome = await self._db.run(rules.delete_version, model, version)
            if outcome.artifact_unreferenced:
                await self._artifacts.remove(outcome.sha256)
        log.info(
            "deleted version %d of model %r%s",
            version,
            model,
            " and its artifact" if outcome.artifact_unreferenced else " (its artifact is shared)",
        )
        await self._publish(outcome.state)
        return outcome.artifact_unreferenced

    # -- audit -----------------------------------------------------------------------------

    async def record_audit(self, record: AuditRecord) -> None:
        """Append to the audit log. Never raises: the audit must not fail the call it records."""
        try:
            await self._db.run(store_audit.add_audit, record)
        except Exception:  # noqa: BLE001 - logged in full; the call itself already happened
            log.exception("cannot write the audit entry %s", record)

    async def list_audit(
        self, where: AuditFilter, *, page_size: int = 100, before_id: int = 0
    ) -> list[AuditRecord]:
        """Audit entries matching `where`, newest first."""
        return await self._db.read(
            store_audit.list_audit, where, page_size=resolve_page_size(page_size), before_id=before_id
        )

    # -- Redis -----------------------------------------------------------------------------

    def _content_lock(self, sha256: str) -> asyncio.Lock:
        return self._content_locks.setdefault(sha256.lower(), asyncio.Lock())

    async def _publish(self, state: RoutingState) -> None:
        try:
            await self._aliases.apply_aliases(
                state.model, state.aliases, state.epoch, deployment=live_deployment(state)
            )
        except CoordinationUnavailable as exc:
            # Committed in the source of truth; the resync loop writes it once Redis is back.
            log.warning(
                "routing of model %r (epoch %d) is committed but not yet live in Redis: %s",
                state.model,
                state.epoch,
                exc,
            )

    async def expire_holds_forever(self, max_sleep_s: float = 60.0) -> None:
        """Stop placing replaced versions once their retention window is over, publishing the
        model's new deployment (with a new epoch), until cancelled."""
        while True:
            self._holds_changed.clear()
            try:
                for state in await self._db.run(rules.expire_holds):
                    log.info(
                        "retention over for model %r: placed versions now %s (epoch %d)",
                        state.model,
                        list(state.placed_versions),
                        state.epoch,
                    )
                    await self._publish(state)
                next_at = await self._db.read(store_deployments.next_hold_expiry)
            except ModelyardError as exc:
                log.warning("cannot expire held versions, will retry: %s", exc)
                next_at = None
            sleep_s = max_sleep_s if next_at is None else min(max_sleep_s, max(0.0, next_at - self._clock()))
            # asyncio.timeout, not wait_for (see model_server.reconciler): cancellation-safe.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(sleep_s + 0.01):
                    await self._holds_changed.wait()

    async def sync_to_redis(self) -> int:
        """Make Redis hold every model's aliases and deployment as this registry has them.

        Only models whose live copy differs are written (with their epoch, so a concurrent
        move is never undone). A Redis whose epoch is ahead of this database (restored from an
        older backup, say) gets the database's state under a fresh, higher epoch.

        Returns:
            How many models were rewritten.

        Raises:
            CoordinationUnavailable: Redis cannot be reached.
        """
        local = await self._db.read(rules.all_routing_states)
        live, live_deployments, _services = await self._aliases.routing_snapshot()
        rewritten = 0
        for model, state in sorted(local.items()):
            live_state = live.get(model, ({}, 0))
            live_dep = live_deployments.get(model)
            if _same(state, live_state, live_dep):
                continue
            if live_state[1] >= state.epoch:
                # Either a change committed (and went live) after our snapshot, or Redis really
                # is ahead of us: look again before deciding.
                state = await self._db.read(rules.routing_state, model)
                if _same(state, live_state, live_dep):
                    continue
                if live_state[1] >= state.epoch:
                    log.warning(
                        "Redis holds epoch %d for model %r, ahead of or equal to the registry's "
                        "%d but different; rewriting it from the registry",
                        live_state[1],
                        model,
                        state.epoch,
                    )
                    await self._db.run(store_aliases.bump_epoch, model, above=live_state[1])
                    state = await self._db.read(rules.routing_state, model)
            if await self._aliases.apply_aliases(
                model, state.aliases, state.epoch, deployment=live_deployment(state)
            ):
                rewritten += 1
        return rewritten

    async def resync_forever(self, interval_s: float) -> None:
        """Run `sync_to_redis` every `interval_s`; Redis being down is logged, not fatal."""
        reachable = True
        while True:
            await asyncio.sleep(interval_s)
            try:
                rewritten = await self.sync_to_redis()
            except CoordinationUnavailable as exc:
                if reachable:
                    log.warning("cannot resync aliases to Redis, will keep trying: %s", exc)
                reachable = False
                continue
            if not reachable:
                log.info("Redis is reachable again")
            reachable = True
            if rewritten:
                log.info("rewrote the aliases of %d model(s) in Redis", rewritten)


def _same(state: RoutingState, live: tuple[dict[str, int], int], deployment: Deployment | None) -> bool:
    return (state.aliases, state.epoch) == live and deployment == live_deployment(state)


def _setting_text(spec: DeploymentSpec) -> str:
    return (
        f"{spec.precision or 'fp32'}/{spec.optimization or 'none'} on {spec.device or 'the default device'}"
    )


def resolve_page_size(page_size: int) -> int:
    """The page size a list call uses: 100 for 0, at most 1000. Raises InvalidArgument."""
    if page_size < 0:
        raise InvalidArgument("page_size is 0 (the default, 100) or more", field="page_size")
    return min(page_size or 100, 1000)


def _check_version_ref(model: str, version: int) -> None:
    check_name(model, field="model", what="model")
    if version < 1:
        raise InvalidArgument("version numbers start at 1", field="version")


def _check_signature(signature: tensor_pb2.Signature) -> None:
    for kind, specs in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        where = f"metadata.signature.{kind}"
        if not specs:
            raise InvalidArgument(f"the signature needs at least one of {kind}", field=where)
        seen: set[str] = set()
        for i, spec in enumerate(specs):
            at = f"{where}[{i}]"
            if not spec.name:
                raise InvalidArgument(f"{at} has no name", field=f"{at}.name")
            if spec.name in seen:
                raise InvalidArgument(f"{at}: the name {spec.name!r} is used twice", field=f"{at}.name")
            seen.add(spec.name)
            if spec.data_type not in _KNOWN_DATA_TYPES:
                raise InvalidArgument(
                    f"{at} ({spec.name!r}) needs a data_type (DATA_TYPE_FP32, ...)",
                    field=f"{at}.data_type",
                )
            if not spec.shape:
                raise InvalidArgument(
                    f"{at} ({spec.name!r}) needs a shape, with -1 for dynamic dimensions",
                    field=f"{at}.shape",
                )
            if any(dim < -1 for dim in spec.shape):
                raise InvalidArgument(
                    f"{at} ({spec.name!r}): a dimension is -1 (dynamic) or a size, not {min(spec.shape)}",
                    field=f"{at}.shape",
                )


def _check_metrics(metrics: dict[str, float]) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise InvalidArgument(
                f"metric {name!r} is {value}; metrics must be finite", field="metadata.metrics"
            )


def _check_baselines(
    baselines: tuple[registry_pb2.InputBaseline, ...], signature: tensor_pb2.Signature
) -> None:
    """An input baseline must describe an input of the signature, once, with usable figures."""
    inputs = [spec.name for spec in signature.inputs]
    seen: set[str] = set()
    for i, baseline in enumerate(baselines):
        at = f"metadata.input_baselines[{i}]"
        if baseline.input not in inputs:
            raise InvalidArgument(
                f"{at} describes input {baseline.input!r}, which the signature does not have "
                f"(inputs: {', '.join(inputs)})",
                field=f"{at}.input",
            )
        if baseline.input in seen:
            raise InvalidArgument(f"{at}: input {baseline.input!r} has two baselines", field=f"{at}.input")
        seen.add(baseline.input)
        if baseline.item_count < 1:
            raise InvalidArgument(f"{at}: item_count must be at least 1", field=f"{at}.item_count")
        if not 1 <= len(baseline.features) <= MAX_FEATURES:
            raise InvalidArgument(
                f"{at}: a baseline describes 1 to {MAX_FEATURES} features, not {len(baseline.features)}",
                field=f"{at}.features",
            )
        for j, feature in enumerate(baseline.features):
            where = f"{at}.features[{j}]"
            if not (math.isfinite(feature.mean) and math.isfinite(feature.std) and feature.std >= 0):
                raise InvalidArgument(f"{where}: mean must be finite and std finite and >= 0", field=where)
            edges, fractions = list(feature.bin_edges), list(feature.bin_fractions)
            if not edges and not fractions:
                continue
            if len(edges) > MAX_BIN_EDGES or len(fractions) != len(edges) + 1:
                raise InvalidArgument(
                    f"{where}: up to {MAX_BIN_EDGES} bin_edges, and one more bin_fractions than "
                    f"bin_edges (got {len(edges)} and {len(fractions)})",
                    field=f"{where}.bin_fractions",
                )
            if not all(math.isfinite(e) for e in edges) or any(a > b for a, b in itertools.pairwise(edges)):
                raise InvalidArgument(
                    f"{where}: bin_edges must be finite and ascending", field=f"{where}.bin_edges"
                )
            if any(not 0 <= f <= 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
                raise InvalidArgument(
                    f"{where}: bin_fractions must be from 0 to 1 and sum to 1 (sum {sum(fractions):g})",
                    field=f"{where}.bin_fractions",
                )
