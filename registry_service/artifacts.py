"""The content-addressed artifact directory: `<root>/sha256/<ab>/<hex>`, one file per content.

Uploads stream into `<root>/tmp/` (same filesystem) while being hashed, are fsynced, checked,
and renamed into place, so a file under `sha256/` is always complete: a crash mid-upload
leaves only a temporary file, removed at the next start. Files are read-only once stored and
are verified against their name before every download.

One registry process per directory: `open()` clears `tmp/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import IO

from modelyard.errors import ArtifactCorrupt, ChecksumMismatch, InvalidArgument, TooLarge

__all__ = ["ArtifactStore", "SHA256_PATTERN", "StagedArtifact"]

log = logging.getLogger(__name__)

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
"""A hex sha256 as the registry stores it: 64 lower-case hex digits."""

# Chunks are written (and hashed) in batches of about this size, so a stream of small messages
# does not cost a thread hop each.
_WRITE_BATCH_BYTES = 1024 * 1024
_HASH_BLOCK_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class StagedArtifact:
    """An artifact written, hashed and checked into `tmp/`, not yet stored."""

    path: Path
    sha256: str
    size: int


class ArtifactStore:
    """Stores and serves artifacts by sha256. Blocking file work runs in worker threads.

    Usage::

        artifacts = ArtifactStore(settings.resolved_artifacts_dir)
        await artifacts.open()
        sha256, size = await artifacts.write(chunks, expected_sha256=h, max_bytes=2**31)
        async for chunk in artifacts.read_verified(sha256, chunk_bytes=1 << 20): ...
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._objects = root / "sha256"
        self._tmp = root / "tmp"

    @property
    def root(self) -> Path:
        """The directory the store lives in."""
        return self._root

    async def open(self) -> None:
        """Create the directories and remove what interrupted uploads left in `tmp/`."""
        await asyncio.to_thread(self._prepare)

    def path_for(self, sha256: str) -> Path:
        """Where the artifact with this hex sha256 lives (whether or not it exists)."""
        if SHA256_PATTERN.fullmatch(sha256) is None:
            raise ValueError(f"not a lower-case hex sha256: {sha256!r}")
        return self._objects / sha256[:2] / sha256

    async def write(
        self,
        chunks: AsyncIterator[bytes],
        *,
        expected_sha256: str,
        max_bytes: int,
        check: Callable[[Path], None] | None = None,
    ) -> tuple[str, int]:
        """Store the bytes of `chunks` if their sha256 is `expected_sha256`.

        Args:
            chunks: The artifact's bytes, in order.
            expected_sha256: The hex sha256 the uploader computed.
            max_bytes: Refuse the upload as soon as it grows past this.
            check: Runs (in a worker thread) on the complete, verified temporary file before it
                is stored; raise to refuse it.

        Returns:
            The sha256 and size of the artifact, now stored. Content that is already stored is
            stored once (the new, verified copy replaces the old one, which repairs a damaged
            file).

        Raises:
            TooLarge: more than `max_bytes` arrived.
            InvalidArgument: no bytes arrived.
            ChecksumMismatch: the bytes do not hash to `expected_sha256`.
            Whatever `check` or `chunks` raise. In every case nothing is stored.
        """
        staged = await self.stage(chunks, expected_sha256=expected_sha256, max_bytes=max_bytes, check=check)
        try:
            await self.install(staged)
        except BaseException:
            await self.discard(staged)
            raise
        return staged.sha256, staged.size

    async def stage(
        self,
        chunks: AsyncIterator[bytes],
        *,
        expected_sha256: str,
        max_bytes: int,
        check: Callable[[Path], None] | None = None,
    ) -> StagedArtifact:
        """Write, hash and check the bytes of `chunks` into a temporary file without storing
        them: `install` stores it, `discard` drops it. An import stages every artifact of a
        bundle first and installs none until all have passed. Arguments and errors are those
        of `write`; on an error nothing is left behind."""
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="upload-", suffix=".part")
        tmp_path = Path(tmp_name)
        # Buffered: its close waits for a write still running in a worker thread (a cancelled
        # upload), where closing a raw descriptor could let that write land in a reused one.
        file = os.fdopen(fd, "wb")
        staged = False
        try:
            digest = hashlib.sha256()
            size = 0
            batch: list[bytes] = []
            batch_bytes = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(
                        f"the artifact is larger than the registry's limit of {max_bytes} bytes "
                        "(MODELYARD_REGISTRY_MAX_ARTIFACT_BYTES)",
                        field="chunk",
                        metadata={"max_bytes": str(max_bytes)},
                    )
                batch.append(chunk)
                batch_bytes += len(chunk)
                if batch_bytes >= _WRITE_BATCH_BYTES:
                    await asyncio.to_thread(_write_batch, file, digest, batch)
                    batch, batch_bytes = [], 0
            if size == 0:
                raise InvalidArgument(
                    "the upload carried no artifact bytes: send them in the messages after the metadata",
                    field="chunk",
                )
            await asyncio.to_thread(_finish, file, digest, batch)
            actual = digest.hexdigest()
            if actual != expected_sha256:
                raise ChecksumMismatch(
                    f"the artifact's sha256 is {actual}, not {expected_sha256} as the metadata "
                    "says: the bytes changed in transit, or the sha256 was computed over another "
                    "file; nothing was stored",
                    field="metadata.sha256",
                    metadata={"expected_sha256": expected_sha256, "actual_sha256": actual},
                )
            if check is not None:
                await asyncio.to_thread(check, tmp_path)
            staged = True
            return StagedArtifact(path=tmp_path, sha256=actual, size=size)
        finally:
            if not staged:
                file.close()
                with contextlib.suppress(FileNotFoundError):
                    tmp_path.unlink()

    async def install(self, staged: StagedArtifact) -> None:
        """Store a staged artifact under its hash (an atomic, fsynced rename)."""
        await asyncio.to_thread(self._install, staged.path, staged.sha256)

    async def discard(self, staged: StagedArtifact) -> None:
        """Drop a staged artifact that will not be installed (nothing happens if it was)."""
        await asyncio.to_thread(staged.path.unlink, missing_ok=True)

    async def read_verified(self, sha256: str, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        """Stream an artifact in chunks of `chunk_bytes`, after checking that it still hashes to
        `sha256`. The check and the stream read the same open file, so a concurrent rename
        cannot slip other bytes in between.

        Raises:
            ArtifactCorrupt: the file is missing or its bytes no longer match (before any byte
                is yielded).
        """
        path = self.path_for(sha256)
        try:
            file = await asyncio.to_thread(open, path, "rb")
        except FileNotFoundError:
            raise ArtifactCorrupt(
                f"the artifact {sha256} is missing from the registry's store",
                metadata={"sha256": sha256},
            ) from None
        try:
            actual = await asyncio.to_thread(_hash_file, file)
            if actual != sha256:
                raise ArtifactCorrupt(
                    f"the stored artifact {sha256} is damaged (its bytes now hash to {actual})",
                    metadata={"sha256": sha256, "actual_sha256": actual},
                )
            await asyncio.to_thread(file.seek, 0)
            while chunk := await asyncio.to_thread(file.read, chunk_bytes):
                yield chunk
        finally:
            file.close()

    async def exists(self, sha256: str) -> bool:
        """Whether an artifact with this sha256 is stored (not whether it is intact)."""
        return await asyncio.to_thread(self.path_for(sha256).is_file)

    async def remove(self, sha256: str) -> None:
        """Delete the artifact with this sha256 (nothing happens if it is not stored). The
        caller makes sure no version references it any more."""
        await asyncio.to_thread(self._remove, sha256)

    # -- in worker threads -----------------------------------------------------------------

    def _remove(self, sha256: str) -> None:
        target = self.path_for(sha256)
        target.unlink(missing_ok=True)
        if target.parent.is_dir():
            _fsync_dir(target.parent)

    def _prepare(self) -> None:
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self._tmp.iterdir():
            log.info("removing %s, left by an interrupted upload", leftover)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def _install(self, tmp_path: Path, sha256: str) -> None:
        target = self.path_for(sha256)
        new_parent = not target.parent.is_dir()
        target.parent.mkdir(exist_ok=True)
        tmp_path.chmod(0o444)
        os.replace(tmp_path, target)
        # A rename (or a new directory) is durable only once its parent directory is on disk.
        _fsync_dir(target.parent)
        if new_parent:
            _fsync_dir(self._objects)


def _write_batch(file: IO[bytes], digest: hashlib._Hash, batch: list[bytes]) -> None:
    for chunk in batch:
        digest.update(chunk)
        file.write(chunk)


def _finish(file: IO[bytes], digest: hashlib._Hash, batch: list[bytes]) -> None:
    _write_batch(file, digest, batch)
    file.flush()
    os.fsync(file.fileno())
    file.close()


def _hash_file(file: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while block := file.read(_HASH_BLOCK_BYTES):
        digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
