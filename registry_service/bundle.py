"""The migration bundle format: a tar of one manifest and the artifacts by hash, written and
read as a stream. No gRPC, no database, no file system here.

A bundle is a POSIX ustar stream of regular files only, in this order:

* `manifest.json`: what the bundle holds (`Manifest`), UTF-8 JSON, at most
  `MAX_MANIFEST_BYTES`;
* `artifacts/<sha256>`: one member per distinct artifact, in the manifest's `artifacts` order,
  named by the hex sha256 of its bytes;
* the two zero blocks that end a tar.

The reader is written here rather than borrowed from `tarfile`: it accepts exactly that layout
and nothing else (no links, directories, pax or GNU extension headers, absolute paths, `..`,
or unknown names), checks every header's checksum, never touches a file system, and reads a
member's bytes as a stream so memory stays flat whatever the artifact's size. Sizes above the
ustar limit (8 GiB) are written and read in the base-256 form GNU tar uses.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from modelyard.errors import BundleInvalid, TooLarge
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service.records import ArtifactFormat, check_name

__all__ = [
    "ARTIFACT_PREFIX",
    "BLOCK_BYTES",
    "BundleAlias",
    "BundleReader",
    "BundleVersion",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "Manifest",
    "Member",
    "end_of_archive",
    "member_header",
    "padding",
]

FORMAT_NAME = "modelyard-bundle"
FORMAT_VERSION = 1
"""Bumped on any change a reader of the previous version would misread; a reader refuses a
newer version instead of guessing."""
MANIFEST_NAME = "manifest.json"
ARTIFACT_PREFIX = "artifacts/"
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
"""A manifest is metadata: a larger one is refused before it is read."""
MAX_VERSIONS = 10_000
BLOCK_BYTES = 512
_MAX_TRAILER_BYTES = 64 * 1024
"""Zeros allowed after the end-of-archive block (tar tools pad to a 10 KiB record)."""
_MAX_OCTAL_SIZE = 8**11 - 1
_HEX = frozenset("0123456789abcdef")


@dataclasses.dataclass(frozen=True, slots=True)
class BundleVersion:
    """One version as the exporting cluster had it."""

    version: int
    format: ArtifactFormat
    sha256: str
    size_bytes: int
    signature: tensor_pb2.Signature
    description: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    input_baselines: tuple[registry_pb2.InputBaseline, ...] = ()
    signer: str = ""
    """Who signed it, as the exporting cluster verified; the importer verifies again."""
    model_signature: bytes = b""
    created_by: str = ""
    create_time: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class BundleAlias:
    """An alias of the exported model and the (source) version it points at."""

    name: str
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """What a bundle holds: `manifest.json`, parsed and checked."""

    source_cluster: str
    model: str
    versions: tuple[BundleVersion, ...]
    model_description: str = ""
    require_signature: bool = False
    aliases: tuple[BundleAlias, ...] = ()
    alias_history: tuple[Mapping[str, Any], ...] = ()
    """The exporting cluster's moves of the exported aliases, newest first, as recorded there
    (informational: the importing cluster records its own moves)."""
    deployment: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The exporting cluster's deployment of the model (informational: hardware differs
    between clusters, so an import never applies it)."""
    export_time: float = 0.0

    def artifacts(self) -> list[tuple[str, int]]:
        """The distinct artifacts (sha256, size), in the order the bundle carries them."""
        seen: dict[str, int] = {}
        for v in self.versions:
            seen.setdefault(v.sha256, v.size_bytes)
        return list(seen.items())

    def to_json(self) -> bytes:
        """The manifest as the bundle stores it."""
        body = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "source_cluster": self.source_cluster,
            "export_time": self.export_time,
            "model": {
                "name": self.model,
                "description": self.model_description,
                "require_signature": self.require_signature,
            },
            "versions": [_version_to_json(v) for v in self.versions],
            "aliases": [{"name": a.name, "version": a.version} for a in self.aliases],
            "alias_history": list(self.alias_history),
            "deployment": dict(self.deployment),
            "artifacts": [{"sha256": sha, "size_bytes": size} for sha, size in self.artifacts()],
        }
        return json.dumps(body, sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and check a manifest.

        Raises:
            BundleInvalid: not JSON, another format or a newer version, or a field missing,
                of the wrong type or inconsistent (the field is named).
        """
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _invalid(f"{MANIFEST_NAME} is not UTF-8 JSON: {exc}", "manifest") from None
        if not isinstance(body, dict):
            raise _invalid(f"{MANIFEST_NAME} must be a JSON object", "manifest")
        if body.get("format") != FORMAT_NAME:
            raise _invalid(f"{MANIFEST_NAME} is not a {FORMAT_NAME} manifest", "manifest.format")
        fv = body.get("format_version")
        if not isinstance(fv, int) or isinstance(fv, bool) or not 1 <= fv <= FORMAT_VERSION:
            raise _invalid(
                f"bundle format version {fv!r} is not one this registry reads (1 to {FORMAT_VERSION}); "
                "import it with a registry at least as new as the exporting one",
                "manifest.format_version",
            )
        source = _str(body, "source_cluster", "manifest")
        if not source:
            raise _invalid("the manifest names no source cluster", "manifest.source_cluster")
        model = _obj(body, "model", "manifest")
        name = _str(model, "name", "manifest.model")
        try:
            check_name(name, field="manifest.model.name", what="model")
        except Exception as exc:
            raise _invalid(str(exc), "manifest.model.name") from None
        raw_versions = _list(body, "versions", "manifest")
        if not 1 <= len(raw_versions) <= MAX_VERSIONS:
            raise _invalid(
                f"a bundle carries 1 to {MAX_VERSIONS} versions, not {len(raw_versions)}", "manifest.versions"
            )
        versions = tuple(_version_from_json(v, f"manifest.versions[{i}]") for i, v in enumerate(raw_versions))
        numbers = [v.version for v in versions]
        if len(set(numbers)) != len(numbers):
            raise _invalid("the manifest lists a version twice", "manifest.versions")
        sizes: dict[str, int] = {}
        for v in versions:
            if sizes.setdefault(v.sha256, v.size_bytes) != v.size_bytes:
                raise _invalid(
                    f"the manifest gives artifact {v.sha256} two sizes", "manifest.versions.size_bytes"
                )
        listed = [
            (_str(a, "sha256", f"manifest.artifacts[{i}]"), _int(a, "size_bytes", f"manifest.artifacts[{i}]"))
            for i, a in enumerate(_list(body, "artifacts", "manifest"))
        ]
        if listed != list(sizes.items()):
            raise _invalid(
                "the manifest's artifacts list does not match its versions' hashes and sizes",
                "manifest.artifacts",
            )
        aliases = []
        for i, a in enumerate(_list(body, "aliases", "manifest")):
            at = f"manifest.aliases[{i}]"
            alias = BundleAlias(_str(a, "name", at), _int(a, "version", at))
            try:
                check_name(alias.name, field=f"{at}.name", what="alias")
            except Exception as exc:
                raise _invalid(str(exc), f"{at}.name") from None
            if alias.version not in numbers:
                raise _invalid(
                    f"alias {alias.name!r} points at version {alias.version}, which the bundle "
                    "does not carry",
                    f"{at}.version",
                )
            aliases.append(alias)
        history = body.get("alias_history", [])
        deployment = body.get("deployment", {})
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise _invalid("alias_history must be a list of objects", "manifest.alias_history")
        if not isinstance(deployment, dict):
            raise _invalid("deployment must be an object", "manifest.deployment")
        export_time = body.get("export_time", 0.0)
        return cls(
            source_cluster=source,
            model=name,
            versions=versions,
            model_description=_str(model, "description", "manifest.model", default=""),
            require_signature=bool(model.get("require_signature", False)),
            aliases=tuple(aliases),
            alias_history=tuple(history),
            deployment=deployment,
            export_time=float(export_time) if isinstance(export_time, int | float) else 0.0,
        )


# -- writing ---------------------------------------------------------------------------------


def member_header(name: str, size: int, *, mtime: int = 0) -> bytes:
    """The 512-byte ustar header of a regular file `name` of `size` bytes."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    header = bytearray(BLOCK_BYTES)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    if size <= _MAX_OCTAL_SIZE:
        header[124:136] = f"{size:011o}\0".encode()
    else:
        # GNU base-256: the top bit of the first byte marks it, then the size big-endian.
        header[124:136] = b"\x80" + size.to_bytes(11, "big")
    header[136:148] = f"{mtime:011o}\0".encode()
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)


def padding(size: int) -> bytes:
    """The zero bytes that round a member of `size` bytes up to whole blocks."""
    return b"\0" * (-size % BLOCK_BYTES)


def end_of_archive() -> bytes:
    """The two zero blocks that end a tar."""
    return b"\0" * (2 * BLOCK_BYTES)


# -- reading ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """A member header the reader accepted: the manifest or an artifact."""

    name: str
    size: int

    @property
    def sha256(self) -> str:
        """The hash an artifact member is named by ("" for the manifest)."""
        return self.name.removeprefix(ARTIFACT_PREFIX) if self.name.startswith(ARTIFACT_PREFIX) else ""


class BundleReader:
    """Reads a bundle from a stream of byte chunks, one member at a time.

    Usage::

        reader = BundleReader(chunks)
        while (member := await reader.next_member()) is not None:
            async for piece in reader.member_chunks(member, max_chunk_bytes=1 << 20): ...

    Every refusal is a `BundleInvalid` naming the member and what is wrong with it.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()
        self._offset = 0
        self._pending: Member | None = None
        self._ended = False

    @property
    def offset(self) -> int:
        """How many bytes of the bundle have been consumed."""
        return self._offset

    async def next_member(self) -> Member | None:
        """The next member's header, or None at the end of the archive.

        Raises:
            BundleInvalid: the previous member was not read to its end, the stream ends
                early, or the header is damaged or not a regular file with an allowed name.
        """
        if self._pending is not None:
            raise RuntimeError("read the previous member's bytes before asking for the next")
        if self._ended:
            return None
        at = self._offset
        block = await self._read_exact(BLOCK_BYTES, "a member header")
        if not any(block):
            # The end-of-archive marker. Tar tools pad an archive with zeros to a whole record
            # (10 KiB by default); anything else after the marker is refused, so a bundle
            # cannot smuggle bytes past the reader.
            self._ended = True
            await self._check_trailer()
            return None
        member = _parse_header(block, at)
        self._pending = member
        return member

    async def member_chunks(self, member: Member, *, max_chunk_bytes: int = 1 << 20) -> AsyncIterator[bytes]:
        """The member's bytes, in pieces of at most `max_chunk_bytes`, then its padding is
        skipped. Raises BundleInvalid when the stream ends before the member does."""
        if self._pending is not member:
            raise RuntimeError("member_chunks takes the member next_member just returned")
        remaining = member.size
        while remaining:
            if not self._buffer:
                chunk = await anext(self._chunks, None)
                if chunk is None:
                    raise self._truncated(f"{member.name} ({member.size - remaining} of {member.size} bytes)")
                self._buffer += chunk
            take = min(remaining, max_chunk_bytes, len(self._buffer))
            piece = bytes(self._buffer[:take])
            del self._buffer[:take]
            remaining -= take
            self._offset += take
            yield piece
        pad = -member.size % BLOCK_BYTES
        if pad:
            await self._read_exact(pad, f"the padding after {member.name}")
        self._pending = None

    async def read_member(self, member: Member, limit: int) -> bytes:
        """A small member's whole content (the manifest). Raises TooLarge past `limit`."""
        if member.size > limit:
            raise TooLarge(
                f"{member.name} is {member.size} bytes, more than the {limit} a bundle's manifest may "
                "be; nothing was stored",
                field=member.name,
                metadata={"member": member.name, "max_bytes": str(limit)},
            )
        return b"".join([piece async for piece in self.member_chunks(member)])

    async def _check_trailer(self) -> None:
        trailing = len(self._buffer)
        clean = not any(self._buffer)
        self._buffer.clear()
        async for chunk in self._chunks:
            trailing += len(chunk)
            clean = clean and not any(chunk)
            if not clean or trailing > _MAX_TRAILER_BYTES:
                break
        if not clean or trailing > _MAX_TRAILER_BYTES:
            raise BundleInvalid(
                f"the bundle carries data after the end of its archive (at byte {self._offset}); "
                "nothing was stored",
                field="chunk",
                metadata={"offset": str(self._offset)},
            )
        self._offset += trailing

    async def _read_exact(self, n: int, what: str) -> bytes:
        while len(self._buffer) < n:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                raise self._truncated(what)
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._offset += n
        return data

    def _truncated(self, what: str) -> BundleInvalid:
        return BundleInvalid(
            f"the bundle ends early, after {self._offset} bytes, in {what}: it is truncated; "
            "nothing was stored",
            field="chunk",
            metadata={"offset": str(self._offset)},
        )


def _parse_header(block: bytes, at: int) -> Member:
    raw_name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    try:
        name = ((prefix + b"/" if prefix else b"") + raw_name).decode("ascii")
    except UnicodeDecodeError:
        raise _member_invalid(repr(raw_name), at, "its name is not ASCII") from None
    stored = block[148:156].split(b"\0", 1)[0].strip()
    try:
        checksum = int(stored or b"-1", 8)
    except ValueError:
        checksum = -1
    if checksum != sum(block[:148]) + 8 * 0x20 + sum(block[156:]):
        raise _member_invalid(name, at, "its header's checksum does not match: the header is damaged")
    if block[257:262] != b"ustar":
        raise _member_invalid(name, at, "it is not a ustar header")
    typeflag = block[156:157]
    if typeflag not in (b"0", b"\0"):
        kind = {
            b"1": "a hard link",
            b"2": "a symbolic link",
            b"3": "a character device",
            b"4": "a block device",
            b"5": "a directory",
            b"6": "a FIFO",
            b"x": "a pax extended header",
            b"g": "a pax global header",
            b"L": "a GNU long name",
            b"K": "a GNU long link name",
        }.get(typeflag, f"of type {typeflag!r}")
        raise _member_invalid(name, at, f"it is {kind}; a bundle holds regular files only")
    if name.startswith("/"):
        raise _member_invalid(name, at, "its path is absolute")
    if ".." in name.split("/") or "\\" in name:
        raise _member_invalid(name, at, "its path leaves the bundle ('..')")
    sha = name.removeprefix(ARTIFACT_PREFIX)
    if name != MANIFEST_NAME and not (
        name.startswith(ARTIFACT_PREFIX) and len(sha) == 64 and set(sha) <= _HEX
    ):
        raise _member_invalid(
            name, at, f"a bundle holds only {MANIFEST_NAME} and {ARTIFACT_PREFIX}<sha256> members"
        )
    field = block[124:136]
    if field[0] & 0x80:
        size = int.from_bytes(field[1:], "big")
    else:
        try:
            size = int(field.split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _member_invalid(name, at, "its size is not a number") from None
    return Member(name=name, size=size)


def _member_invalid(name: str, at: int, why: str) -> BundleInvalid:
    return BundleInvalid(
        f"bundle member {name} (at byte {at}) is refused: {why}; nothing was stored",
        field="chunk",
        metadata={"member": name[:200], "offset": str(at)},
    )


def _invalid(message: str, field: str) -> BundleInvalid:
    return BundleInvalid(f"{message}; nothing was stored", field=field)


# -- manifest fields -------------------------------------------------------------------------


def _version_to_json(v: BundleVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "format": v.format.value,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "signature": json_format.MessageToDict(v.signature, preserving_proto_field_name=True),
        "description": v.description,
        "labels": dict(v.labels),
        "metrics": dict(v.metrics),
        "input_baselines": [
            json_format.MessageToDict(b, preserving_proto_field_name=True) for b in v.input_baselines
        ],
        "signer": v.signer,
        "model_signature": base64.b64encode(v.model_signature).decode(),
        "created_by": v.created_by,
        "create_time": v.create_time,
    }


def _version_from_json(raw: Any, at: str) -> BundleVersion:
    if not isinstance(raw, dict):
        raise _invalid(f"{at} must be an object", at)
    number = _int(raw, "version", at)
    if number < 1:
        raise _invalid(f"{at}.version must be 1 or more", f"{at}.version")
    try:
        fmt = ArtifactFormat(_str(raw, "format", at))
    except ValueError:
        raise _invalid(
            f"{at}.format must be one of {[f.value for f in ArtifactFormat]}", f"{at}.format"
        ) from None
    sha = _str(raw, "sha256", at)
    if len(sha) != 64 or not set(sha) <= _HEX:
        raise _invalid(f"{at}.sha256 must be 64 lower-case hex digits", f"{at}.sha256")
    size = _int(raw, "size_bytes", at)
    if size < 1:
        raise _invalid(f"{at}.size_bytes must be 1 or more", f"{at}.size_bytes")
    try:
        signature = json_format.ParseDict(_obj(raw, "signature", at), tensor_pb2.Signature())
        baselines = tuple(
            json_format.ParseDict(b, registry_pb2.InputBaseline()) for b in _list(raw, "input_baselines", at)
        )
    except json_format.ParseError as exc:
        raise _invalid(f"{at}: {exc}", at) from None
    labels = raw.get("labels", {})
    metrics = raw.get("metrics", {})
    if not isinstance(labels, dict) or not all(isinstance(x, str) for x in (*labels, *labels.values())):
        raise _invalid(f"{at}.labels must map strings to strings", f"{at}.labels")
    if not isinstance(metrics, dict) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in metrics.values()
    ):
        raise _invalid(f"{at}.metrics must map strings to finite numbers", f"{at}.metrics")
    try:
        model_signature = base64.b64decode(_str(raw, "model_signature", at, default=""), validate=True)
    except ValueError:
        raise _invalid(f"{at}.model_signature must be base64", f"{at}.model_signature") from None
    create_time = raw.get("create_time", 0.0)
    return BundleVersion(
        version=number,
        format=fmt,
        sha256=sha,
        size_bytes=size,
        signature=signature,
        description=_str(raw, "description", at, default=""),
        labels=labels,
        metrics={k: float(v) for k, v in metrics.items()},
        input_baselines=baselines,
        signer=_str(raw, "signer", at, default=""),
        model_signature=model_signature,
        created_by=_str(raw, "created_by", at, default=""),
        create_time=float(create_time) if isinstance(create_time, int | float) else 0.0,
    )


_MISSING = object()


def _get(body: Mapping[str, Any], key: str, at: str, default: Any) -> Any:
    value = body.get(key, default)
    if value is _MISSING:
        raise _invalid(f"{at}.{key} is missing", f"{at}.{key}")
    return value


def _str(body: Mapping[str, Any], key: str, at: str, default: Any = _MISSING) -> str:
    value = _get(body, key, at, default)
    if not isinstance(value, str):
        raise _invalid(f"{at}.{key} must be a string", f"{at}.{key}")
    return value


def _int(body: Mapping[str, Any], key: str, at: str) -> int:
    value = _get(body, key, at, _MISSING)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(f"{at}.{key} must be an integer", f"{at}.{key}")
    return value


def _obj(body: Mapping[str, Any], key: str, at: str) -> dict[str, Any]:
    value = _get(body, key, at, _MISSING)
    if not isinstance(value, dict):
        raise _invalid(f"{at}.{key} must be an object", f"{at}.{key}")
    return value


def _list(body: Mapping[str, Any], key: str, at: str) -> Sequence[Any]:
    value = _get(body, key, at, _MISSING)
    if not isinstance(value, list):
        raise _invalid(f"{at}.{key} must be a list", f"{at}.{key}")
    return value
