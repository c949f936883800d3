"""ArtifactStore and the archive sniffing: streamed writes with hashing, limits and atomic
install; verified reads; nothing left behind on any failure."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest
import torch

from modelyard.errors import ArtifactCorrupt, ChecksumMismatch, InvalidArgument, TooLarge, UnsafeArtifact
from registry_service.artifacts import ArtifactStore
from registry_service.formats import check_archive
from registry_service.records import ArtifactFormat
from tests.artifact_corpus import evil_pickle, export_archive, replace_members, torchscript_archive

DATA = bytes(range(256)) * 9000  # about 2.2 MiB: more than one write batch
SHA = hashlib.sha256(DATA).hexdigest()


async def chunks_of(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def failing_after(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part
    raise ConnectionError("the client went away")


@pytest.fixture
async def artifacts(tmp_path: Path) -> ArtifactStore:
    store = ArtifactStore(tmp_path / "artifacts")
    await store.open()
    return store


def contents(store: ArtifactStore) -> tuple[list[Path], list[Path]]:
    return (
        sorted(p for p in (store.root / "sha256").rglob("*") if p.is_file()),
        sorted((store.root / "tmp").iterdir()),
    )


async def test_write_then_read_verified(artifacts: ArtifactStore) -> None:
    assert await artifacts.write(chunks_of(DATA), expected_sha256=SHA, max_bytes=len(DATA)) == (
        SHA,
        len(DATA),
    )
    assert contents(artifacts) == ([artifacts.path_for(SHA)], [])
    assert artifacts.path_for(SHA).relative_to(artifacts.root).parts == ("sha256", SHA[:2], SHA)
    assert await artifacts.exists(SHA)
    read = [chunk async for chunk in artifacts.read_verified(SHA, chunk_bytes=1 << 20)]
    assert [len(c) for c in read] == [1 << 20, 1 << 20, len(DATA) - 2 * (1 << 20)]
    assert b"".join(read) == DATA
    # The same content again is stored once.
    await artifacts.write(chunks_of(DATA, 1000), expected_sha256=SHA, max_bytes=len(DATA))
    assert contents(artifacts) == ([artifacts.path_for(SHA)], [])


@pytest.mark.parametrize(
    "make_chunks,expected,error",
    [
        (lambda: chunks_of(DATA), "0" * 64, ChecksumMismatch),
        (lambda: chunks_of(DATA), SHA, TooLarge),
        (lambda: chunks_of(b""), SHA, InvalidArgument),
        (lambda: failing_after([DATA[:2_000_000]]), SHA, ConnectionError),
    ],
    ids=["checksum", "too-large", "empty", "stream-fails"],
)
async def test_a_failed_write_leaves_nothing(
    artifacts: ArtifactStore, make_chunks: object, expected: str, error: type[Exception]
) -> None:
    max_bytes = len(DATA) - 1 if error is TooLarge else len(DATA)
    with pytest.raises(error):
        await artifacts.write(make_chunks(), expected_sha256=expected, max_bytes=max_bytes)  # type: ignore[operator]  # a factory
    assert contents(artifacts) == ([], [])


async def test_a_refusing_check_leaves_nothing(artifacts: ArtifactStore) -> None:
    def refuse(path: Path) -> None:
        assert path.read_bytes() == DATA
        raise InvalidArgument("no", field="metadata.format")

    with pytest.raises(InvalidArgument):
        await artifacts.write(chunks_of(DATA), expected_sha256=SHA, max_bytes=len(DATA), check=refuse)
    assert contents(artifacts) == ([], [])


async def test_read_refuses_damaged_or_missing_files(artifacts: ArtifactStore) -> None:
    await artifacts.write(chunks_of(DATA), expected_sha256=SHA, max_bytes=len(DATA))
    path = artifacts.path_for(SHA)
    path.chmod(0o644)
    path.write_bytes(DATA[:-1] + b"\x00")
    stream = artifacts.read_verified(SHA, chunk_bytes=1024)
    with pytest.raises(ArtifactCorrupt, match="damaged"):
        await anext(stream)
    path.unlink()
    with pytest.raises(ArtifactCorrupt, match="missing"):
        await anext(artifacts.read_verified(SHA, chunk_bytes=1024))


async def test_open_removes_what_interrupted_uploads_left(tmp_path: Path) -> None:
    (tmp_path / "artifacts" / "tmp").mkdir(parents=True)
    (tmp_path / "artifacts" / "tmp" / "upload-1.part").write_bytes(b"half")
    store = ArtifactStore(tmp_path / "artifacts")
    await store.open()
    assert contents(store) == ([], [])


def test_check_archive(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    path.write_bytes(torchscript_archive())
    check_archive(path, ArtifactFormat.TORCHSCRIPT)
    with pytest.raises(InvalidArgument) as caught:
        check_archive(path, ArtifactFormat.TORCH_EXPORT)
    assert caught.value.field == "metadata.format"
    path.write_bytes(export_archive())
    check_archive(path, ArtifactFormat.TORCH_EXPORT)
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(InvalidArgument) as caught:
        check_archive(path, ArtifactFormat.TORCHSCRIPT)  # a torch.save pickle
    assert caught.value.field == "metadata.format"
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidArgument):
        check_archive(path, ArtifactFormat.TORCHSCRIPT)
    path.write_bytes(replace_members(torchscript_archive(), {"data.pkl": evil_pickle(tmp_path / "m")}))
    with pytest.raises(UnsafeArtifact) as unsafe:
        check_archive(path, ArtifactFormat.TORCHSCRIPT)
    assert "archive/data.pkl" in unsafe.value.message and unsafe.value.field == "chunk"
    assert not (tmp_path / "m").exists()
