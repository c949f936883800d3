"""The bundle format on its own: the writer's tar is what tar tools read, the reader takes back
what the writer wrote (base-256 sizes included) and refuses every other kind of member."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator

import pytest

from modelyard.errors import BundleInvalid, TooLarge
from modelyard.v1 import tensor_pb2
from registry_service import bundle
from registry_service.bundle import BundleAlias, BundleReader, BundleVersion, Manifest
from registry_service.records import ArtifactFormat

SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
    outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 2])],
)


def _manifest(data: bytes) -> Manifest:
    return Manifest(
        source_cluster="cluster-a",
        model="mlp",
        versions=(
            BundleVersion(
                version=3,
                format=ArtifactFormat.TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                signature=SIGNATURE,
                labels={"team": "a"},
                metrics={"auc": 0.9},
                model_signature=b"\x00sig",
            ),
        ),
        aliases=(BundleAlias("production", 3),),
    )


def _write(manifest: Manifest, artifacts: dict[str, bytes]) -> bytes:
    body = manifest.to_json()
    out = bundle.member_header(bundle.MANIFEST_NAME, len(body)) + body + bundle.padding(len(body))
    for sha, data in artifacts.items():
        out += (
            bundle.member_header(bundle.ARTIFACT_PREFIX + sha, len(data)) + data + bundle.padding(len(data))
        )
    return out + bundle.end_of_archive()


async def _chunks(data: bytes, size: int = 700) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _read_all(data: bytes) -> dict[str, bytes]:
    reader = BundleReader(_chunks(data))
    members: dict[str, bytes] = {}
    while (member := await reader.next_member()) is not None:
        members[member.name] = b"".join([p async for p in reader.member_chunks(member, max_chunk_bytes=1000)])
    return members


async def test_the_reader_takes_back_what_the_writer_wrote_and_tar_reads_it_too() -> None:
    data = bytes(range(256)) * 13
    manifest = _manifest(data)
    written = _write(manifest, {manifest.versions[0].sha256: data})
    members = await _read_all(written)
    assert Manifest.from_json(members[bundle.MANIFEST_NAME]) == manifest
    assert members[bundle.ARTIFACT_PREFIX + manifest.versions[0].sha256] == data
    with tarfile.open(fileobj=io.BytesIO(written), mode="r|") as archive:
        names = [info.name for info in archive]
    assert names == [bundle.MANIFEST_NAME, bundle.ARTIFACT_PREFIX + manifest.versions[0].sha256]


def test_sizes_past_the_ustar_limit_use_base_256() -> None:
    header = bundle.member_header(bundle.ARTIFACT_PREFIX + "a" * 64, 20 * 1024**3)
    assert header[124] == 0x80
    assert tarfile.TarInfo.frombuf(header, "ascii", "strict").size == 20 * 1024**3


def _raw(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data)
    return info.tobuf(format=tarfile.USTAR_FORMAT) + data + bundle.padding(len(data))


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_raw("../manifest.json"), "leaves the bundle"),
        (_raw("/manifest.json"), "absolute"),
        (_raw(bundle.ARTIFACT_PREFIX + "0" * 64, tarfile.SYMTYPE), "symbolic link"),
        (_raw(bundle.ARTIFACT_PREFIX + "0" * 64, tarfile.LNKTYPE), "hard link"),
        (_raw("artifacts", tarfile.DIRTYPE), "directory"),
        (_raw("pax", tarfile.XHDTYPE), "pax extended header"),
        (_raw("artifacts/ABC"), "holds only"),
        (_raw("readme.txt", data=b"hi"), "holds only"),
    ],
)
async def test_every_other_kind_of_member_is_refused(member: bytes, why: str) -> None:
    reader = BundleReader(_chunks(member + bundle.end_of_archive()))
    with pytest.raises(BundleInvalid, match=why):
        await reader.next_member()


async def test_a_damaged_header_or_an_early_end_is_refused() -> None:
    header = bytearray(_raw(bundle.MANIFEST_NAME, data=b"{}"))
    header[130] ^= 0x01
    with pytest.raises(BundleInvalid, match="checksum"):
        await BundleReader(_chunks(bytes(header))).next_member()
    reader = BundleReader(_chunks(_raw(bundle.MANIFEST_NAME, data=b"{}" * 400)[:900]))
    member = await reader.next_member()
    assert member is not None
    with pytest.raises(BundleInvalid, match="ends early"):
        await reader.read_member(member, 1 << 20)
    with pytest.raises(BundleInvalid, match="ends early"):
        await BundleReader(_chunks(b"\x01" * 100)).next_member()


async def test_zero_padding_after_the_end_is_accepted_anything_else_refused() -> None:
    data = b"abc"
    manifest = _manifest(data)
    written = _write(manifest, {manifest.versions[0].sha256: data})
    assert len(await _read_all(written + b"\0" * 9216)) == 2  # padded to a 10 KiB record
    with pytest.raises(BundleInvalid, match="after the end"):
        await _read_all(written + _raw("readme.txt", data=b"hi"))


async def test_an_oversize_manifest_is_refused_before_it_is_read() -> None:
    info = tarfile.TarInfo(bundle.MANIFEST_NAME)
    info.size = bundle.MAX_MANIFEST_BYTES + 1
    reader = BundleReader(_chunks(info.tobuf(format=tarfile.USTAR_FORMAT)))
    member = await reader.next_member()
    assert member is not None
    with pytest.raises(TooLarge):
        await reader.read_member(member, bundle.MAX_MANIFEST_BYTES)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.update(format_version=2), "manifest.format_version"),
        (lambda m: m.update(format="zip"), "manifest.format"),
        (lambda m: m["versions"][0].update(sha256="XY"), "manifest.versions[0].sha256"),
        (lambda m: m["versions"][0].update(size_bytes="9"), "manifest.versions[0].size_bytes"),
        (lambda m: m["versions"][0].update(format="pickle"), "manifest.versions[0].format"),
        (lambda m: m["aliases"][0].update(version=9), "manifest.aliases[0].version"),
        (lambda m: m["artifacts"][0].update(size_bytes=1), "manifest.artifacts"),
        (lambda m: m["model"].update(name="../etc"), "manifest.model.name"),
        (lambda m: m["versions"][0]["metrics"].update(auc=float("nan")), "manifest.versions[0].metrics"),
    ],
)
def test_a_manifest_that_lies_or_is_malformed_names_its_field(change: object, field: str) -> None:
    body = json.loads(_manifest(b"abc").to_json())
    change(body)  # type: ignore[operator]  # the lambdas of the table
    with pytest.raises(BundleInvalid) as caught:
        Manifest.from_json(json.dumps(body).encode())
    assert caught.value.field == field
