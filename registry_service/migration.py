"""Moving a model between clusters: export it as a bundle (`bundle`), import a bundle.

An import is trusted by construction, not by the sender:

* every artifact streams into a temporary file while it is hashed, then gets the upload's
  static inspection (`formats.check_archive`) and the upload's model signature check, exactly
  as `Registry.upload_version` does; nothing is installed until every artifact of the bundle
  has passed and the stream has ended cleanly;
* then the artifacts are renamed into the store and every version is recorded in one SQLite
  transaction, so a crash (or a kill -9) at any point leaves no partial version: at worst a
  temporary file, removed at the next start, or an unreferenced artifact file;
* a version is recognised by its origin (source cluster, version, sha256), so importing the
  same bundle again records nothing new;
* aliases move only when asked, after the commit, through the registry's own alias path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modelyard.errors import (
    AliasNotFound,
    BundleInvalid,
    ChecksumMismatch,
    FailedPrecondition,
    ModelNotFound,
)
from registry_service import bundle
from registry_service.artifacts import StagedArtifact
from registry_service.bundle import BundleAlias, BundleReader, BundleVersion, Manifest
from registry_service.formats import check_archive
from registry_service.records import (
    ArtifactFormat,
    ImportItem,
    ModelRecord,
    UploadMetadata,
    VersionOrigin,
    VersionRecord,
    VersionState,
    check_name,
)

if TYPE_CHECKING:
    from registry_service.registry import Registry

__all__ = ["AliasOutcome", "ImportOutcome", "ImportedVersion", "export_bundle", "import_bundle"]

log = logging.getLogger(__name__)

MAX_HISTORY_ENTRIES = 1000
"""The most alias moves an export carries (newest first)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ImportedVersion:
    """One version of a bundle and what it is here."""

    source_version: int
    version: VersionRecord
    created: bool
    """False when an earlier import had already recorded it."""


@dataclasses.dataclass(frozen=True, slots=True)
class AliasOutcome:
    """How an alias of a bundle was moved here."""

    alias: str
    version: int
    moved_by: str
    """"promote" (PromoteVersion: waited for a ready replica), "set" (SetAlias semantics: no
    model server was running to wait for) or "unchanged" (it already pointed there)."""
    previous_version: int


@dataclasses.dataclass(frozen=True, slots=True)
class ImportOutcome:
    """What an import did."""

    manifest: Manifest
    versions: tuple[ImportedVersion, ...]
    aliases: tuple[AliasOutcome, ...]
    bytes_read: int


async def export_bundle(
    registry: Registry, model: str, versions: Sequence[int] = (), aliases: Sequence[str] = ()
) -> tuple[Manifest, AsyncGenerator[bytes, None]]:
    """A model's bundle: the manifest, and the bundle's bytes as a stream.

    Args:
        versions: The versions to carry; with `aliases` also the ones they point at. Neither:
            every active version.
        aliases: The aliases to carry; neither given: every alias pointing at a carried version.

    Raises:
        InvalidArgument, ModelNotFound, VersionNotFound, AliasNotFound: bad or unknown names.
        FailedPrecondition: a version asked for is archived.
    The stream raises ArtifactCorrupt if a stored artifact no longer matches its hash.
    """
    record = await registry.get_model(model)
    alias_map = {a.name: a.version for a in record.aliases}
    all_versions = {v.version: v for v in await registry.list_versions(model)}
    wanted: dict[int, VersionRecord] = {}
    for number in versions:
        wanted[number] = await registry.get_version(model, number)
    for name in aliases:
        check_name(name, field="aliases", what="alias")
        if name not in alias_map:
            raise AliasNotFound(f"model {model!r} has no alias {name!r}", field="aliases")
        wanted[alias_map[name]] = all_versions[alias_map[name]]
    if not versions and not aliases:
        wanted = {n: v for n, v in all_versions.items() if v.state is VersionState.ACTIVE}
    if not wanted:
        raise FailedPrecondition(f"model {model!r} has no active version to export", field="model")
    for v in wanted.values():
        if v.state is not VersionState.ACTIVE:
            raise FailedPrecondition(
                f"version {v.version} of model {model!r} is {v.state.value} and is not exported",
                field="versions",
            )
    carried_aliases = [
        BundleAlias(name, number)
        for name, number in sorted(alias_map.items())
        if (name in aliases if aliases else number in wanted)
    ]
    history = await registry.list_alias_history(model, page_size=MAX_HISTORY_ENTRIES)
    names = {a.name for a in carried_aliases}
    state = await registry.get_deployment(model)
    manifest = Manifest(
        source_cluster=registry.cluster_id,
        model=model,
        model_description=record.description,
        require_signature=record.require_signature,
        versions=tuple(_bundle_version(wanted[n]) for n in sorted(wanted)),
        aliases=tuple(carried_aliases),
        alias_history=tuple(
            {
                "alias": h.alias,
                "from_version": h.from_version,
                "to_version": h.to_version,
                "kind": h.kind.value,
                "reason": h.reason,
                "actor": h.actor,
                "time": h.time,
            }
            for h in history
            if h.alias in names
        ),
        deployment=_spec_dict(state.spec.to_json()),
        export_time=time.time(),
    )
    return manifest, _bundle_bytes(registry, manifest)


async def _bundle_bytes(registry: Registry, manifest: Manifest) -> AsyncGenerator[bytes, None]:
    body = manifest.to_json()
    yield bundle.member_header(bundle.MANIFEST_NAME, len(body)) + body + bundle.padding(len(body))
    for sha256, size in manifest.artifacts():
        yield bundle.member_header(bundle.ARTIFACT_PREFIX + sha256, size)
        chunks = registry.artifact_chunks(sha256)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk
        if pad := bundle.padding(size):
            yield pad
    yield bundle.end_of_archive()


async def import_bundle(
    registry: Registry, chunks: AsyncIterator[bytes], *, with_aliases: bool = False, actor: str = ""
) -> ImportOutcome:
    """Import a bundle: all of its versions or none, each checked like an upload.

    Raises:
        BundleInvalid: a member that is not the manifest or an artifact by hash, a link, a path
            outside the bundle, a manifest that does not parse or does not match the
            artifacts (a hash or a size that lies, one missing or extra), a truncated stream.
        TooLarge: the manifest or an artifact is over the limit.
        ChecksumMismatch: an artifact's bytes do not hash to the name the bundle gives them.
        UnsafeArtifact: an artifact fails the upload's static inspection.
        ModelSignatureInvalid: a model signature does not verify here, or one is missing where
            the model here requires it.
        In every case nothing is stored. Alias moves happen after the commit and raise what
        SetAlias or PromoteVersion raise; importing the bundle again then moves them.
    """
    reader = BundleReader(chunks)
    first = await reader.next_member()
    if first is None or first.name != bundle.MANIFEST_NAME:
        raise BundleInvalid(
            f"a bundle starts with {bundle.MANIFEST_NAME}"
            + (f", not {first.name}" if first else ", and this one is empty")
            + "; nothing was stored",
            field="chunk",
        )
    manifest = Manifest.from_json(await reader.read_member(first, bundle.MAX_MANIFEST_BYTES))
    try:
        here: ModelRecord | None = await registry.get_model(manifest.model)
    except ModelNotFound:
        here = None
    require_signature = here.require_signature if here is not None else manifest.require_signature
    # Signatures are verified before any artifact byte is read, as an upload does: a signature
    # signs the declared sha256, which the bytes are then held to.
    signers = {
        v.version: await registry.verify_signature(
            v.model_signature,
            sha256=v.sha256,
            required=require_signature,
            field=f"manifest.versions[{i}].model_signature",
        )
        for i, v in enumerate(manifest.versions)
    }
    expected = dict(manifest.artifacts())
    formats: dict[str, set[ArtifactFormat]] = {}
    for v in manifest.versions:
        formats.setdefault(v.sha256, set()).add(v.format)
    staged: dict[str, StagedArtifact] = {}
    installed = False
    try:
        while (member := await reader.next_member()) is not None:
            sha256 = member.sha256
            if not sha256:
                raise BundleInvalid(
                    f"the bundle carries a second {bundle.MANIFEST_NAME}; nothing was stored",
                    field="chunk",
                    metadata={"member": member.name},
                )
            if sha256 not in expected:
                raise BundleInvalid(
                    f"bundle member {member.name} is no artifact the manifest lists; nothing was stored",
                    field="chunk",
                    metadata={"member": member.name},
                )
            if sha256 in staged:
                raise BundleInvalid(
                    f"bundle member {member.name} comes twice; nothing was stored",
                    field="chunk",
                    metadata={"member": member.name},
                )
            if member.size != expected[sha256]:
                raise BundleInvalid(
                    f"bundle member {member.name} is {member.size} bytes, but the manifest says "
                    f"{expected[sha256]}; nothing was stored",
                    field="manifest.artifacts",
                    metadata={"member": member.name, "size_bytes": str(member.size)},
                )
            staged[sha256] = await _stage(registry, reader, member, formats[sha256])
        missing = [sha for sha in expected if sha not in staged]
        if missing:
            raise BundleInvalid(
                f"the bundle ends without artifact(s) {', '.join(missing)} that its manifest lists; "
                "it is truncated or incomplete; nothing was stored",
                field="chunk",
                metadata={"missing_sha256": missing[0]},
            )
        items = [
            ImportItem(
                metadata=UploadMetadata(
                    model=manifest.model,
                    format=v.format,
                    sha256=v.sha256,
                    signature=v.signature,
                    description=v.description,
                    labels=dict(v.labels),
                    metrics=dict(v.metrics),
                    input_baselines=v.input_baselines,
                    model_signature=v.model_signature,
                ),
                size_bytes=v.size_bytes,
                signer=signers[v.version],
                origin=VersionOrigin(manifest.source_cluster, v.version, v.sha256),
            )
            for v in manifest.versions
        ]
        recorded = await registry.commit_import(
            ModelRecord(
                name=manifest.model,
                description=manifest.model_description,
                create_time=0.0,
                latest_version=0,
                epoch=0,
                require_signature=manifest.require_signature,
            ),
            items,
            list(staged.values()),
            actor=actor,
        )
        installed = True
    finally:
        if not installed:
            for artifact in staged.values():
                await registry.discard_staged(artifact)
    imported = tuple(
        ImportedVersion(source_version=v.version, version=record, created=created)
        for v, (record, created) in zip(manifest.versions, recorded, strict=True)
    )
    log.info(
        "imported model %r from cluster %s: %s",
        manifest.model,
        manifest.source_cluster,
        ", ".join(
            f"v{i.source_version} -> v{i.version.version}{'' if i.created else ' (already here)'}"
            for i in imported
        ),
    )
    moved: list[AliasOutcome] = []
    if with_aliases:
        numbers = {i.source_version: i.version.version for i in imported}
        for alias in manifest.aliases:
            moved.append(
                await registry.move_imported_alias(
                    manifest.model,
                    alias.name,
                    numbers[alias.version],
                    reason=f"imported from cluster {manifest.source_cluster} (its version {alias.version})",
                    actor=actor,
                )
            )
    return ImportOutcome(manifest=manifest, versions=imported, aliases=tuple(moved), bytes_read=reader.offset)


async def _stage(
    registry: Registry, reader: BundleReader, member: bundle.Member, formats: set[ArtifactFormat]
) -> StagedArtifact:
    def check(path: Path) -> None:
        for fmt in sorted(formats, key=lambda f: f.value):
            check_archive(path, fmt)

    try:
        return await registry.stage_artifact(
            reader.member_chunks(member), expected_sha256=member.sha256, check=check
        )
    except ChecksumMismatch as exc:
        raise ChecksumMismatch(
            f"bundle member {member.name}'s bytes hash to {exc.metadata.get('actual_sha256')}, not to "
            "the sha256 that names it: the bundle is damaged or was altered; nothing was stored",
            field="chunk",
            metadata={"member": member.name, **exc.metadata},
        ) from None


def _bundle_version(v: VersionRecord) -> BundleVersion:
    return BundleVersion(
        version=v.version,
        format=v.format,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        signature=v.signature,
        description=v.description,
        labels=v.labels,
        metrics=v.metrics,
        input_baselines=v.input_baselines,
        signer=v.signer,
        model_signature=v.model_signature,
        created_by=v.created_by,
        create_time=v.create_time,
    )


def _spec_dict(text: str) -> dict[str, object]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}
