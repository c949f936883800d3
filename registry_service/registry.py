"""The registry core: models, versions, artifacts and aliases, with no gRPC in sight.

SQLite (`store.RegistryStore`) is the source of truth and the artifact directory
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
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Protocol

from modelyard.errors import (
    ArtifactCorrupt,
    CoordinationUnavailable,
    FailedPrecondition,
    InvalidArgument,
)
from modelyard.v1 import tensor_pb2
from registry_service.artifacts import SHA256_PATTERN, ArtifactStore
from registry_service.formats import check_archive
from registry_service.records import (
    AliasChange,
    ModelRecord,
    UploadMetadata,
    VersionRecord,
    VersionState,
    check_name,
)
from registry_service.store import RegistryStore

__all__ = ["AliasSink", "Registry"]

log = logging.getLogger(__name__)

_KNOWN_DATA_TYPES = frozenset(tensor_pb2.DataType.values()) - {tensor_pb2.DATA_TYPE_UNSPECIFIED}


class AliasSink(Protocol):
    """Where alias maps go live: `modelyard.coordination.CoordinationStore` in production."""

    async def apply_aliases(self, model: str, aliases: dict[str, int], epoch: int) -> bool:
        """Replace the model's alias map if `epoch` is newer; False if it was not."""
        ...

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        """Every model's live alias map and epoch."""
        ...


class Registry:
    """What the registry does, for any transport.

    Args:
        store: The metadata database (opened).
        artifacts: The artifact directory (opened).
        aliases: Where alias maps go live (Redis).
        max_artifact_bytes: Largest artifact an upload may carry.
        download_chunk_bytes: Size of the chunks `download` yields.

    Usage::

        registry = Registry(store, artifacts, coordination, max_artifact_bytes=2**31,
                            download_chunk_bytes=2**20)
        await registry.create_model("demo", "an MLP")
        version = await registry.upload_version(metadata, chunks)
        await registry.set_alias("demo", "production", version.version, expected_version=0)
    """

    def __init__(
        self,
        store: RegistryStore,
        artifacts: ArtifactStore,
        aliases: AliasSink,
        *,
        max_artifact_bytes: int,
        download_chunk_bytes: int,
    ) -> None:
        self._store = store
        self._artifacts = artifacts
        self._aliases = aliases
        self._max_artifact_bytes = max_artifact_bytes
        self._download_chunk_bytes = download_chunk_bytes

    # -- models ----------------------------------------------------------------------------

    async def create_model(self, name: str, description: str = "", *, request_id: str = "") -> ModelRecord:
        """Create an empty model.

        Raises:
            InvalidArgument: the name breaks the naming rule.
            AlreadyExists: the name is taken (a retry with the same request id returns the model).
        """
        check_name(name, field="name", what="model")
        return await self._store.create_model(name, description, request_id=request_id)

    async def get_model(self, name: str) -> ModelRecord:
        """A model with its aliases. Raises InvalidArgument or ModelNotFound."""
        check_name(name, field="name", what="model")
        return await self._store.get_model(name)

    async def list_models(self) -> list[ModelRecord]:
        """Every model with its aliases, sorted by name."""
        return await self._store.list_models()

    # -- versions --------------------------------------------------------------------------

    async def upload_version(
        self, metadata: UploadMetadata, chunks: AsyncIterator[bytes], *, actor: str = ""
    ) -> VersionRecord:
        """Store a new version: check the metadata, store the artifact, then record the version.

        The artifact goes first and the row second, so a crash in between leaves at worst an
        unreferenced file, never a version without its bytes. Nothing of `chunks` is read if
        the metadata is refused.

        Args:
            metadata: What the uploader says about the artifact.
            chunks: The artifact's bytes.
            actor: Who uploads (recorded as `created_by`).

        Raises:
            InvalidArgument: bad name, format, sha256 or signature, no bytes, or an archive
                that is not of the stated format (the field at fault is named).
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
        # Refuse an unknown model before any byte is read.
        await self._store.get_model(metadata.model)
        stored_sha256, size = await self._artifacts.write(
            chunks,
            expected_sha256=sha256,
            max_bytes=self._max_artifact_bytes,
            check=lambda path: check_archive(path, fmt),
        )
        version = await self._store.insert_version(
            dataclasses.replace(metadata, sha256=stored_sha256),
            sha256=stored_sha256,
            size_bytes=size,
            created_by=actor,
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
        return await self._store.get_version(model, version)

    async def list_versions(self, model: str) -> list[VersionRecord]:
        """A model's versions, oldest first. Raises InvalidArgument or ModelNotFound."""
        check_name(model, field="model", what="model")
        return await self._store.list_versions(model)

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

    # -- aliases ---------------------------------------------------------------------------

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None = None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
    ) -> AliasChange:
        """Point an alias at a version (compare-and-set), record the move, and publish it.

        Args:
            expected_version: What the alias must point at now; 0 means it must not exist yet;
                None moves it whatever it points at.

        Raises:
            InvalidArgument: bad names or numbers.
            ModelNotFound / VersionNotFound: unknown model or version.
            FailedPrecondition: the version is archived.
            Conflict: the alias moved since the caller read it (ABORTED).
        """
        _check_version_ref(model, version)
        check_name(alias, field="alias", what="alias")
        if expected_version is not None and expected_version < 0:
            raise InvalidArgument(
                "expected_version must be 0 (the alias must not exist) or a version number",
                field="expected_version",
            )
        change = await self._store.set_alias(
            model,
            alias,
            version,
            expected_version=expected_version,
            reason=reason,
            actor=actor,
            request_id=request_id,
        )
        if change.changed:
            log.info(
                "alias %r of model %r: version %d -> %d (epoch %d)",
                alias,
                model,
                change.previous_version,
                version,
                change.epoch,
            )
            await self._publish(model, change.aliases, change.epoch)
        return change

    async def _publish(self, model: str, aliases: dict[str, int], epoch: int) -> None:
        try:
            await self._aliases.apply_aliases(model, aliases, epoch)
        except CoordinationUnavailable as exc:
            # Committed in the source of truth; the resync loop writes it once Redis is back.
            log.warning(
                "aliases of model %r (epoch %d) are committed but not yet live in Redis: %s",
                model,
                epoch,
                exc,
            )

    async def sync_to_redis(self) -> int:
        """Make Redis hold every model's aliases as this registry has them.

        Only models whose live copy differs are written (with their epoch, so a concurrent
        move is never undone). A Redis whose epoch is ahead of this database (restored from an
        older backup, say) gets the database's aliases under a fresh, higher epoch.

        Returns:
            How many models were rewritten.

        Raises:
            CoordinationUnavailable: Redis cannot be reached.
        """
        local = await self._store.all_alias_states()
        live = await self._aliases.all_aliases()
        rewritten = 0
        for model, state in sorted(local.items()):
            live_state = live.get(model, ({}, 0))
            if live_state == state:
                continue
            aliases, epoch = state
            if live_state[1] >= epoch:
                # Either a move committed (and went live) after our snapshot, or Redis really is
                # ahead of us: look again before deciding.
                aliases, epoch = await self._store.alias_state(model)
                if (aliases, epoch) == live_state:
                    continue
                if live_state[1] >= epoch:
                    log.warning(
                        "Redis holds epoch %d for model %r, ahead of the registry's %d; "
                        "rewriting it from the registry",
                        live_state[1],
                        model,
                        epoch,
                    )
                    aliases, epoch = await self._store.bump_epoch(model, above=live_state[1])
            if await self._aliases.apply_aliases(model, aliases, epoch):
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
