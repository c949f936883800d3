"""`modelyard models export | import | migrate`: move a model between clusters as a bundle.

A bundle (docs/migration.md) is a tar of a manifest and the artifacts by hash, streamed by the
registry's ExportModel and read by ImportModel; this module only moves bytes, never holding
more than a chunk: `export` writes the stream to FILE (through FILE.part, renamed when
complete), `import` streams FILE to a registry, `migrate` pipes one registry's export into
another's import. The registry checks everything; a refused bundle prints its status and
exits 1. On a terminal a progress bar shows the bytes moved.

Wiring (in `modelyard/cli_registry.add_to`)::

    from modelyard_cli import migrate as cli_migrate
    cli_migrate.register(models_app)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from modelyard.tls import open_channel
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1 import registry_service_pb2_grpc
from modelyard_cli.local_cluster import api_key_for, client_tls_for

__all__ = ["register", "CHUNK_BYTES"]

CHUNK_BYTES = 1024 * 1024
"""The bytes of a bundle per message, both ways."""
_DEFAULT_REGISTRY = "127.0.0.1:50061"
_BLOCK = 512

console = Console()
_err = Console(stderr=True)

_RegistryOpt = Annotated[str, typer.Option("--registry", help="host:port of the registry.")]
_ApiKeyOpt = Annotated[
    str,
    typer.Option(
        "--api-key",
        envvar="MODELYARD_API_KEY",
        help="API key to call with (default: the local cluster's admin key); needs the admin grant.",
    ),
]
_VersionsOpt = Annotated[
    list[int] | None, typer.Option("--version", help="A version to carry (repeatable; default: all active).")
]
_AliasesOpt = Annotated[
    list[str] | None,
    typer.Option("--alias", help="An alias to carry, with the version it points at (repeatable)."),
]
_WithAliasesOpt = Annotated[
    bool,
    typer.Option(
        "--with-aliases",
        help="Also point the bundle's aliases at the imported versions (by the zero-downtime "
        "promote when a model server runs there, else as alias set does).",
    ),
]
_JsonOpt = Annotated[bool, typer.Option("--json", help="Print the import's response as JSON.")]


def register(models_app: typer.Typer) -> None:
    """Add `export`, `import` and `migrate` to `modelyard models`."""
    models_app.command("export")(models_export)
    models_app.command("import")(models_import)
    models_app.command("migrate")(models_migrate)


def models_export(
    model: str,
    out: Annotated[Path, typer.Option("-o", "--out", dir_okay=False, help="The bundle file to write.")],
    versions: _VersionsOpt = None,
    aliases: _AliasesOpt = None,
    registry: _RegistryOpt = _DEFAULT_REGISTRY,
    api_key: _ApiKeyOpt = "",
) -> None:
    """Write a model's bundle (versions, artifacts, aliases and their history, deployment) to a file."""
    request = pb.ExportModelRequest(model=model, versions=versions or [], aliases=aliases or [])
    partial = out.with_name(out.name + ".part")

    async def run(channel: grpc.aio.Channel) -> tuple[int, float]:
        stub: Any = registry_service_pb2_grpc.RegistryServiceStub(channel)
        started = time.monotonic()
        written = 0
        with _progress(f"exporting {model}") as (progress, task), partial.open("wb") as file:
            sized = _TotalFromManifest()
            async for message in stub.ExportModel(request):
                await asyncio.to_thread(file.write, message.chunk)
                written += len(message.chunk)
                if progress is not None:
                    progress.update(task, completed=written, total=sized.feed(message.chunk))
            file.flush()
            os.fsync(file.fileno())
        return written, time.monotonic() - started

    try:
        written, elapsed = _run(lambda: _with_channel(registry, api_key, run))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    console.print(f"wrote [bold]{out}[/bold]: {written} bytes in {elapsed:.1f}s ({_rate(written, elapsed)})")


def models_import(
    bundle: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A bundle from models export.")],
    with_aliases: _WithAliasesOpt = False,
    registry: _RegistryOpt = _DEFAULT_REGISTRY,
    api_key: _ApiKeyOpt = "",
    as_json: _JsonOpt = False,
) -> None:
    """Import a bundle: all its versions or none, each checked as an upload is; again: nothing changes."""
    total = bundle.stat().st_size

    async def run(channel: grpc.aio.Channel) -> pb.ImportModelResponse:
        stub: Any = registry_service_pb2_grpc.RegistryServiceStub(channel)
        with _progress(f"importing {bundle.name}", total) as (progress, task):

            async def chunks() -> AsyncIterator[bytes]:
                sent = 0
                with bundle.open("rb") as file:
                    while block := await asyncio.to_thread(file.read, CHUNK_BYTES):
                        sent += len(block)
                        if progress is not None:
                            progress.update(task, completed=sent)
                        yield block

            response: pb.ImportModelResponse = await stub.ImportModel(
                _import_requests(chunks(), with_aliases)
            )
            return response

    started = time.monotonic()
    response = _run(lambda: _with_channel(registry, api_key, run))
    _print_import(response, time.monotonic() - started, as_json)


def models_migrate(
    model: str,
    to: Annotated[str, typer.Option("--to", help="host:port of the registry to move the model to.")],
    versions: _VersionsOpt = None,
    aliases: _AliasesOpt = None,
    with_aliases: _WithAliasesOpt = False,
    registry: _RegistryOpt = _DEFAULT_REGISTRY,
    api_key: _ApiKeyOpt = "",
    to_api_key: Annotated[
        str,
        typer.Option(
            "--to-api-key", envvar="MODELYARD_TO_API_KEY", help="API key for --to (default: --api-key's)."
        ),
    ] = "",
    as_json: _JsonOpt = False,
) -> None:
    """Move a model from --registry to --to: the export streams straight into the import."""
    request = pb.ExportModelRequest(model=model, versions=versions or [], aliases=aliases or [])

    async def run(source: grpc.aio.Channel) -> pb.ImportModelResponse:
        async def into_target(target: grpc.aio.Channel) -> pb.ImportModelResponse:
            source_stub: Any = registry_service_pb2_grpc.RegistryServiceStub(source)
            target_stub: Any = registry_service_pb2_grpc.RegistryServiceStub(target)
            with _progress(f"migrating {model}") as (progress, task):
                sized = _TotalFromManifest()

                async def chunks() -> AsyncIterator[bytes]:
                    moved = 0
                    async for message in source_stub.ExportModel(request):
                        moved += len(message.chunk)
                        if progress is not None:
                            progress.update(task, completed=moved, total=sized.feed(message.chunk))
                        yield message.chunk

                response: pb.ImportModelResponse = await target_stub.ImportModel(
                    _import_requests(chunks(), with_aliases)
                )
                return response

        migrated: pb.ImportModelResponse = await _with_channel(
            to, to_api_key or api_key, into_target, own_key=bool(to_api_key or api_key)
        )
        return migrated

    started = time.monotonic()
    response = _run(lambda: _with_channel(registry, api_key, run))
    _print_import(response, time.monotonic() - started, as_json, moved_to=to)


async def _import_requests(
    chunks: AsyncIterator[bytes], with_aliases: bool
) -> AsyncIterator[pb.ImportModelRequest]:
    yield pb.ImportModelRequest(options=pb.ImportModelOptions(with_aliases=with_aliases))
    async for chunk in chunks:
        for start in range(0, len(chunk), CHUNK_BYTES):
            yield pb.ImportModelRequest(chunk=chunk[start : start + CHUNK_BYTES])


async def _with_channel(
    address: str, api_key: str, fn: Callable[[grpc.aio.Channel], Any], *, own_key: bool = True
) -> Any:
    token = (api_key if own_key else "") or api_key_for(address)
    async with open_channel(address, client_tls_for(address), token=token, client="cli") as channel:
        return await fn(channel)


def _run(fn: Callable[[], Any]) -> Any:
    try:
        return asyncio.run(fn())
    except grpc.aio.AioRpcError as exc:
        _err.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
        raise typer.Exit(1) from None


class _progress:
    """A rich progress bar on a terminal, nothing elsewhere: yields (progress or None, task)."""

    def __init__(self, what: str, total: int | None = None) -> None:
        self._progress = (
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=_err,
                transient=True,
            )
            if _err.is_terminal
            else None
        )
        self._what = what
        self._total = total

    def __enter__(self) -> tuple[Progress | None, TaskID]:
        if self._progress is None:
            return None, TaskID(0)
        self._progress.start()
        return self._progress, self._progress.add_task(self._what, total=self._total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


class _TotalFromManifest:
    """The bundle's size, read from its first member (the manifest) as the bytes go by: the
    progress bar's total. None until the manifest has passed, or if it does not parse."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._total: int | None = None
        self._done = False

    def feed(self, chunk: bytes) -> int | None:
        if self._done:
            return self._total
        self._head += chunk
        if len(self._head) < _BLOCK:
            return None
        try:
            size = int(bytes(self._head[124:136]).split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            self._done = True
            return None
        if size > 8 * 1024 * 1024:
            self._done = True
            return None
        if len(self._head) < _BLOCK + size:
            return None
        self._done = True
        try:
            manifest = json.loads(bytes(self._head[_BLOCK : _BLOCK + size]))
            artifacts = sum(_BLOCK + -(-a["size_bytes"] // _BLOCK) * _BLOCK for a in manifest["artifacts"])
            self._total = _BLOCK + -(-size // _BLOCK) * _BLOCK + artifacts + 2 * _BLOCK
        except (ValueError, KeyError, TypeError):
            self._total = None
        self._head = bytearray()
        return self._total


def _rate(size: int, elapsed_s: float) -> str:
    return f"{size / 1e6 / elapsed_s:.1f} MB/s" if elapsed_s > 0 else "-"


def _print_import(
    response: pb.ImportModelResponse, elapsed_s: float, as_json: bool, moved_to: str = ""
) -> None:
    if as_json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
        return
    created = sum(1 for v in response.versions if v.created)
    where = f" to {moved_to}" if moved_to else ""
    console.print(
        f"[bold]{response.model}[/bold]{where} from cluster {response.source_cluster}: "
        f"{created} version(s) created, {len(response.versions) - created} already there; "
        f"{response.bundle_bytes} bytes in {elapsed_s:.1f}s ({_rate(response.bundle_bytes, elapsed_s)})"
    )
    table = Table("source version", "version here", "sha256", "size", "")
    for v in response.versions:
        mv = v.model_version
        table.add_row(
            str(v.source_version),
            str(mv.version),
            mv.sha256[:12] + "…",
            str(mv.size_bytes),
            "created" if v.created else "already here",
        )
    console.print(table)
    for a in response.aliases:
        console.print(
            f"alias [bold]{a.alias}[/bold] -> {a.version} (was {a.previous_version or 'none'}, {a.moved_by})"
        )
