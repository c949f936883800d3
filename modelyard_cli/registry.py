"""`modelyard models | alias | deploy | audit [verify]`: the registry from the command line.

Every command talks gRPC to the registry (`--registry`, default 127.0.0.1:50061; over TLS with
the CA and client certificate of the running `modelyard up --tls` whose cluster file names that
address, see `local_cluster.client_tls_for`), prints a
readable table, or the response as protobuf JSON with `--json`. Calls carry an API key
(`--api-key`, `$MODELYARD_API_KEY`, else the local cluster's admin key, see
`local_cluster.api_key_for`); the audit log and the alias history name the key's principal.
Failures print the status and the registry's message, and exit with 1.

`audit verify` checks the audit log's hash chain (`modelyard.audit_chain`) through the
registry, or offline in its SQLite file with `--db`; it exits with 1 on tampering.

Wiring (in `modelyard_cli/app.py`)::

    from modelyard_cli import registry as cli_registry
    cli_registry.add_to(app)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import grpc
import typer
from google.protobuf import duration_pb2, field_mask_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelyard import audit_chain
from modelyard.baseline import DEFAULT_BINS, compute_baseline, load_baseline_sample
from modelyard.errors import InvalidArgument
from modelyard.tls import open_channel
from modelyard.v1 import registry_pb2, registry_service_pb2_grpc, tensor_pb2
from modelyard.v1 import registry_service_pb2 as pb
from modelyard_cli.local_cluster import api_key_for, client_tls_for

__all__ = [
    "models_app",
    "alias_app",
    "deploy_app",
    "audit_app",
    "add_to",
    "parse_batch_sizes",
    "parse_tensor_spec",
]

DEFAULT_REGISTRY = "127.0.0.1:50061"
UPLOAD_CHUNK_BYTES = 1024 * 1024

models_app = typer.Typer(
    help="Create models, upload versions, list, archive and delete them.", no_args_is_help=True
)
alias_app = typer.Typer(
    help="Move aliases: set, promote (zero downtime), rollback, history.", no_args_is_help=True
)
deploy_app = typer.Typer(
    help="How a model is served: placement, batching, traffic split.", no_args_is_help=True
)
audit_app = typer.Typer(help="The registry's audit log of mutating calls.")

console = Console()

RegistryOpt = Annotated[str, typer.Option("--registry", help="host:port of the registry.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the response as protobuf JSON.")]
ApiKeyOpt = Annotated[
    str,
    typer.Option(
        "--api-key",
        envvar="MODELYARD_API_KEY",
        help="API key to call with (default: the admin key of the local cluster, DATA_DIR/admin.key).",
    ),
]

T = TypeVar("T")
_Stub = Any  # the async stub type exists only in the typing stubs


def add_to(app: typer.Typer) -> None:
    """Mount the sub-apps on the `modelyard` command."""
    app.add_typer(models_app, name="models")
    app.add_typer(alias_app, name="alias")
    app.add_typer(deploy_app, name="deploy")
    app.add_typer(audit_app, name="audit")
    # Imported here: cli_migrate registers on models_app, defined above.
    from modelyard_cli import migrate as cli_migrate

    cli_migrate.register(models_app)


def call_registry(
    registry: str, api_key: str, fn: Callable[[grpc.aio.Channel, tuple[tuple[str, str], ...]], Awaitable[T]]
) -> T:
    """Run `fn(channel, metadata)` against the registry with the caller's credentials (on the
    channel; `metadata` is extra call metadata); a failure prints its status and message and
    exits 1."""

    async def run() -> T:
        # The key rides on the channel, so no call can go out without it.
        token = api_key or api_key_for(registry)
        async with open_channel(registry, client_tls_for(registry), token=token, client="cli") as channel:
            return await fn(channel, ())

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        Console(stderr=True).print(f"[red]{exc.code().name}[/red]: {exc.details()}")
        raise typer.Exit(1) from None


def _call(registry: str, api_key: str, fn: Callable[[_Stub, tuple[tuple[str, str], ...]], Awaitable[T]]) -> T:
    return call_registry(
        registry, api_key, lambda channel, md: fn(registry_service_pb2_grpc.RegistryServiceStub(channel), md)
    )


def _print_json(message: Message) -> None:
    sys.stdout.write(json_format.MessageToJson(message, preserving_proto_field_name=True) + "\n")


def time_text(ts: timestamp_pb2.Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _state(state: int) -> str:
    return registry_pb2.ModelVersionState.Name(state).removeprefix("MODEL_VERSION_STATE_").lower()


MOVE_KINDS: dict[str, registry_pb2.AliasMoveKind] = {
    # cast: the enum wrapper's items() is typed with int values; they are AliasMoveKind values.
    name.removeprefix("ALIAS_MOVE_KIND_").lower().replace("_", "-"): cast("registry_pb2.AliasMoveKind", value)
    for name, value in registry_pb2.AliasMoveKind.items()
    if value != registry_pb2.ALIAS_MOVE_KIND_UNSPECIFIED
}
"""`--kind` names: set, promote, rollback, canary-promote, canary-rollback."""


def move_kind_text(kind: int) -> str:
    """An AliasMoveKind as the CLI shows it ("-" for a move recorded before moves were typed)."""
    return next((name for name, value in MOVE_KINDS.items() if value == kind), "-")


def parse_move_kind(text: str, *, param: str = "--kind") -> registry_pb2.AliasMoveKind:
    """`--kind rollback` -> ALIAS_MOVE_KIND_ROLLBACK.

    Raises:
        typer.BadParameter: not one of `MOVE_KINDS`.
    """
    kind = MOVE_KINDS.get(text.strip().lower().replace("_", "-"))
    if kind is None:
        raise typer.BadParameter(f"{text!r}: one of {', '.join(MOVE_KINDS)}", param_hint=param)
    return kind


def parse_batch_sizes(text: str) -> list[int]:
    """`--preferred-batch-sizes`: "8,16,32" -> [8, 16, 32]; "" -> [].

    Raises:
        typer.BadParameter: an item is not a whole number (the registry checks the range).
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not all(item.isdigit() for item in items):
        raise typer.BadParameter(
            f"{text!r}: expected comma-separated whole numbers, such as 8,16,32",
            param_hint="--preferred-batch-sizes",
        )
    return [int(item) for item in items]


def parse_tensor_spec(text: str) -> tensor_pb2.TensorSpec:
    """`name:dtype:shape`, e.g. `input:fp32:-1,64`, as a TensorSpec.

    Raises:
        typer.BadParameter: the text is not of that form or names an unknown dtype.
    """
    try:
        name, dtype, shape = text.split(":")
        # cast: the enum wrapper's Value() is typed int; it returns a DataType value.
        data_type = cast("tensor_pb2.DataType", tensor_pb2.DataType.Value("DATA_TYPE_" + dtype.upper()))
        dims = [int(d) for d in shape.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected name:dtype:shape such as input:fp32:-1,64 (dtypes: "
            + ", ".join(n.removeprefix("DATA_TYPE_").lower() for n in tensor_pb2.DataType.keys()[1:])
            + ")"
        ) from None
    return tensor_pb2.TensorSpec(name=name, data_type=data_type, shape=dims)


# -- models ---------------------------------------------------------------------------------


@models_app.command("create")
def models_create(
    name: str,
    description: Annotated[str, typer.Option(help="What the model does.")] = "",
    require_signature: Annotated[
        bool,
        typer.Option(
            "--require-signature",
            help="Refuse every version without a model signature by a signer the cluster trusts.",
        ),
    ] = False,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Create an empty model."""
    request = pb.CreateModelRequest(name=name, description=description, require_signature=require_signature)
    response = _call(registry, api_key, lambda s, md: s.CreateModel(request, metadata=md))
    if as_json:
        _print_json(response)
    else:
        console.print(f"created model [bold]{response.model.name}[/bold]")


@models_app.command("upload")
def models_upload(
    model: str,
    artifact: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="A .pt or .pt2 file.")],
    inputs: Annotated[list[str], typer.Option("--input", help="name:dtype:shape, e.g. input:fp32:-1,64")],
    outputs: Annotated[list[str], typer.Option("--output", help="name:dtype:shape, e.g. output:fp32:-1,10")],
    fmt: Annotated[
        str, typer.Option("--format", help="torchscript or torch_export; default from the suffix.")
    ] = "",
    description: Annotated[str, typer.Option(help="What changed in this version.")] = "",
    label: Annotated[list[str] | None, typer.Option(help="key=value, repeatable.")] = None,
    baseline_sample: Annotated[
        Path | None,
        typer.Option(
            "--baseline-sample",
            exists=True,
            dir_okay=False,
            help="A torch.save'd dict input name -> tensor (or one tensor for a single-input "
            "model), e.g. a slice of the training set: its statistics are recorded with the "
            "version as the drift baseline. Only tensors are read (weights_only).",
        ),
    ] = None,
    bins: Annotated[int, typer.Option(help="Quantile bins per feature of the baseline.")] = DEFAULT_BINS,
    model_signature: Annotated[
        Path | None,
        typer.Option(
            "--model-signature",
            exists=True,
            dir_okay=False,
            help="The OpenSSF model signature of FILE (`model_signing sign key|certificate FILE "
            "--signature FILE.sig`), verified by the registry and by every model server.",
        ),
    ] = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Upload a new version of a model (streamed, sha256-checked by the registry), optionally
    with the input baseline the monitor compares traffic with."""
    kind = fmt or ("torch_export" if artifact.suffix == ".pt2" else "torchscript")
    formats = {
        "torchscript": registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
        "torch_export": registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT,
    }
    if kind not in formats:
        raise typer.BadParameter(f"--format is torchscript or torch_export, not {kind!r}")
    labels = dict(item.split("=", 1) for item in (label or []) if "=" in item)
    digest = hashlib.sha256()
    with artifact.open("rb") as file:
        for block in iter(lambda: file.read(UPLOAD_CHUNK_BYTES), b""):
            digest.update(block)
    signature = tensor_pb2.Signature(
        inputs=[parse_tensor_spec(i) for i in inputs], outputs=[parse_tensor_spec(o) for o in outputs]
    )
    baselines = []
    if baseline_sample is not None:
        try:
            baselines = compute_baseline(load_baseline_sample(baseline_sample, signature), bins=bins)
        except InvalidArgument as exc:
            raise typer.BadParameter(exc.message, param_hint="--baseline-sample") from None
    metadata = pb.UploadModelVersionMetadata(
        model=model,
        format=formats[kind],
        sha256=digest.hexdigest(),
        signature=signature,
        description=description,
        labels=labels,
        input_baselines=baselines,
        model_signature=model_signature.read_bytes() if model_signature is not None else b"",
    )

    async def requests() -> AsyncIterator[pb.UploadModelVersionRequest]:
        yield pb.UploadModelVersionRequest(metadata=metadata)
        with artifact.open("rb") as file:
            for block in iter(lambda: file.read(UPLOAD_CHUNK_BYTES), b""):
                yield pb.UploadModelVersionRequest(chunk=block)

    response = _call(registry, api_key, lambda s, md: s.UploadModelVersion(requests(), metadata=md))
    if as_json:
        _print_json(response)
    else:
        v = response.model_version
        console.print(
            f"uploaded [bold]{v.model}[/bold] version [bold]{v.version}[/bold] "
            f"({v.size_bytes} bytes, sha256 {v.sha256[:12]}…"
            + (f", signed by {v.signer}" if v.signer else "")
            + ")"
            + "".join(
                f"; baseline of {b.input}: {len(b.features)} features over {b.item_count} items"
                for b in v.input_baselines
            )
        )


@models_app.command("list")
def models_list(
    registry: RegistryOpt = DEFAULT_REGISTRY, as_json: JsonOpt = False, api_key: ApiKeyOpt = ""
) -> None:
    """Every model with its latest version and aliases."""
    response = _call(registry, api_key, lambda s, md: s.ListModels(pb.ListModelsRequest()))
    if as_json:
        _print_json(response)
        return
    table = Table("model", "latest", "aliases", "created", "description")
    for m in response.models:
        aliases = ", ".join(f"{a.name}→{a.version}" for a in m.aliases) or "-"
        table.add_row(m.name, str(m.latest_version or "-"), aliases, time_text(m.create_time), m.description)
    console.print(table)


@models_app.command("show")
def models_show(
    name: str, registry: RegistryOpt = DEFAULT_REGISTRY, as_json: JsonOpt = False, api_key: ApiKeyOpt = ""
) -> None:
    """One model: aliases and deployment."""

    async def both(s: _Stub, md: Any) -> tuple[pb.GetModelResponse, pb.GetDeploymentResponse]:
        return await s.GetModel(pb.GetModelRequest(name=name)), await s.GetDeployment(
            pb.GetDeploymentRequest(model=name)
        )

    model, deployment = _call(registry, api_key, both)
    if as_json:
        sys.stdout.write(
            json.dumps(
                {
                    "model": json_format.MessageToDict(model.model, preserving_proto_field_name=True),
                    "deployment": json_format.MessageToDict(
                        deployment.deployment, preserving_proto_field_name=True
                    ),
                },
                indent=2,
            )
            + "\n"
        )
        return
    m = model.model
    console.print(f"[bold]{m.name}[/bold]  {m.description}")
    console.print(f"latest version {m.latest_version or '-'}, created {time_text(m.create_time)}")
    table = Table("alias", "version", "moved")
    for a in m.aliases:
        table.add_row(a.name, str(a.version), time_text(a.update_time))
    console.print(table)
    _print_deployment(deployment.deployment)


@models_app.command("versions")
def models_versions(
    model: str, registry: RegistryOpt = DEFAULT_REGISTRY, as_json: JsonOpt = False, api_key: ApiKeyOpt = ""
) -> None:
    """A model's versions, oldest first."""
    response = _call(
        registry, api_key, lambda s, md: s.ListModelVersions(pb.ListModelVersionsRequest(model=model))
    )
    if as_json:
        _print_json(response)
        return
    table = Table("version", "state", "format", "size", "sha256", "created", "by", "description")
    for v in response.model_versions:
        table.add_row(
            str(v.version),
            _state(v.state),
            registry_pb2.ArtifactFormat.Name(v.format).removeprefix("ARTIFACT_FORMAT_").lower(),
            f"{v.size_bytes:,}",
            v.sha256[:12],
            time_text(v.create_time),
            v.created_by,
            v.description,
        )
    console.print(table)


@models_app.command("archive")
def models_archive(
    model: str,
    version: int,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Archive a version (refused while an alias points at it or it is pinned)."""
    response = _call(
        registry,
        api_key,
        lambda s, md: s.ArchiveModelVersion(
            pb.ArchiveModelVersionRequest(model=model, version=version), metadata=md
        ),
    )
    if as_json:
        _print_json(response)
    else:
        console.print(f"archived {model} version {version}")


@models_app.command("delete")
def models_delete(
    model: str,
    version: int,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Delete a version, and its artifact unless another version shares it."""
    response = _call(
        registry,
        api_key,
        lambda s, md: s.DeleteModelVersion(
            pb.DeleteModelVersionRequest(model=model, version=version), metadata=md
        ),
    )
    if as_json:
        _print_json(response)
    else:
        kept = "artifact deleted" if response.artifact_deleted else "artifact kept (shared)"
        console.print(f"deleted {model} version {version}; {kept}")


# -- aliases --------------------------------------------------------------------------------


def _print_move(model: str, alias: str, previous: int, version: int, epoch: int) -> None:
    console.print(
        f"{model} [bold]{alias}[/bold]: {previous or 'none'} → [bold]{version}[/bold] (epoch {epoch})"
    )


@alias_app.command("set")
def alias_set(
    model: str,
    alias: str,
    version: int,
    expect: Annotated[
        int | None, typer.Option(help="Compare-and-set: the version it must point at now (0: new).")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the history.")] = "",
    kind: Annotated[
        str,
        typer.Option(
            help="What the move is, for the history: set, rollback (back to an earlier version), "
            "canary-promote or canary-rollback. Who made it comes from your credentials."
        ),
    ] = "set",
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Point an alias at a version at once (use `promote` to wait for readiness first)."""
    request = pb.SetAliasRequest(
        model=model, alias=alias, version=version, reason=reason, kind=parse_move_kind(kind)
    )
    if expect is not None:
        request.expected_version = expect
    response = _call(registry, api_key, lambda s, md: s.SetAlias(request, metadata=md))
    if as_json:
        _print_json(response)
    else:
        _print_move(model, alias, response.previous_version, response.alias.version, response.epoch)


@alias_app.command("promote")
def alias_promote(
    model: str,
    alias: str,
    version: int,
    expect: Annotated[
        int | None, typer.Option(help="Compare-and-set: the version it must point at now (0: new).")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="How long to wait for ready replicas.")] = 120.0,
    reason: Annotated[str, typer.Option(help="Why, for the history.")] = "",
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Zero-downtime move: load the version, wait until it is ready, then flip the alias."""
    request = pb.PromoteVersionRequest(
        model=model, alias=alias, version=version, reason=reason, ready_timeout=duration_pb2.Duration()
    )
    request.ready_timeout.FromNanoseconds(int(timeout_s * 1e9))
    if expect is not None:
        request.expected_version = expect
    response = _call(
        registry, api_key, lambda s, md: s.PromoteVersion(request, metadata=md, timeout=timeout_s + 30)
    )
    if as_json:
        _print_json(response)
    else:
        _print_move(model, alias, response.previous_version, response.alias.version, response.epoch)
        console.print(f"ready on {response.ready_replicas} model server(s) before the flip")


@alias_app.command("rollback")
def alias_rollback(
    model: str,
    alias: str,
    expect: Annotated[
        int | None, typer.Option(help="Compare-and-set: the version it must point at now.")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the history.")] = "",
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Point an alias back at its previous target."""
    request = pb.RollbackAliasRequest(model=model, alias=alias, reason=reason)
    if expect is not None:
        request.expected_version = expect
    response = _call(registry, api_key, lambda s, md: s.RollbackAlias(request, metadata=md))
    if as_json:
        _print_json(response)
    else:
        _print_move(model, alias, response.previous_version, response.alias.version, response.epoch)


@alias_app.command("history")
def alias_history(
    model: str,
    alias: Annotated[str, typer.Argument(help="Only this alias; all when omitted.")] = "",
    kind: Annotated[
        str,
        typer.Option(
            help="Only moves of this kind: set, promote, rollback, canary-promote, canary-rollback."
        ),
    ] = "",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most entries to show.")] = 50,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Moves of a model's aliases, newest first: what kind of move, who made it, and why."""
    request = pb.ListAliasHistoryRequest(model=model, alias=alias, page_size=limit)
    if kind:
        request.kind = parse_move_kind(kind)
    response = _call(registry, api_key, lambda s, md: s.ListAliasHistory(request))
    if as_json:
        _print_json(response)
        return
    table = Table("when", "alias", "kind", "from", "to", "epoch", "who", "why", "request id")
    for e in response.entries:
        table.add_row(
            time_text(e.time),
            e.alias,
            move_kind_text(e.kind),
            str(e.from_version or "-"),
            str(e.to_version),
            str(e.epoch),
            escape(e.actor),
            escape(e.reason),
            e.request_id,
        )
    console.print(table)


# -- deployments ----------------------------------------------------------------------------


def _print_deployment(d: registry_pb2.Deployment) -> None:
    table = Table("setting", "value", show_header=False)
    table.add_row("placed versions", ", ".join(map(str, d.placed_versions)) or "-")
    table.add_row("pinned versions", ", ".join(map(str, d.pinned_versions)) or "-")
    table.add_row("replicas", str(d.replicas or "all model servers"))
    table.add_row("device", d.device or "default")
    table.add_row("precision", d.precision or "fp32")
    table.add_row("optimization", d.optimization or "none")
    if d.HasField("max_abs_error") or d.HasField("min_top1_agreement"):
        table.add_row(
            "tolerance",
            f"max_abs_error {d.max_abs_error if d.HasField('max_abs_error') else 'any'}, "
            f"min_top1_agreement {d.min_top1_agreement if d.HasField('min_top1_agreement') else 'any'}",
        )
    table.add_row("max batch size", str(d.max_batch_size or "default"))
    table.add_row(
        "max queue delay", f"{d.max_queue_delay_ms:g} ms" if d.HasField("max_queue_delay_ms") else "default"
    )
    table.add_row("max queue size", str(d.max_queue_size or "default"))
    table.add_row("instances", str(d.instances or "default"))
    table.add_row("preferred batch sizes", ", ".join(map(str, d.preferred_batch_sizes)) or "default")
    table.add_row("execution", d.execution or "default")
    table.add_row("traffic split", ", ".join(f"{k} {v}%" for k, v in sorted(d.traffic_split.items())) or "-")
    table.add_row("shadow", f"{d.shadow_alias} ({d.shadow_fraction:.0%})" if d.shadow_alias else "-")
    table.add_row("epoch", str(d.epoch))
    console.print(table)


ProofRows = list[tuple[int, registry_pb2.OptimizationReport]]


async def _proof_of(stub: _Stub, model: str, d: registry_pb2.Deployment) -> ProofRows:
    """The stored proof of the deployment's setting: for each placed version, the reports
    measured by SetDeployment (against fp32 eager on the CPU: `reference_device` set) at its
    precision and optimisation."""
    wanted = (d.optimization or "none", d.precision or "fp32")
    rows: ProofRows = []
    for version in d.placed_versions:
        got = await stub.GetModelVersion(pb.GetModelVersionRequest(model=model, version=version))
        rows += [
            (version, r)
            for r in got.model_version.optimization_reports
            if r.reference_device and (r.optimization, r.precision) == wanted
        ]
    return rows


def _print_proof(rows: ProofRows) -> None:
    if not rows:
        return
    table = Table(
        "version", "device", "max abs error", "max rel error", "top-1", "sample", "server", "measured",
        title="proof of the device / precision / optimization (against fp32 eager on the CPU)",
    )  # fmt: skip
    for version, r in rows:
        table.add_row(
            str(version),
            r.device,
            f"{r.max_abs_error:.3g}",
            f"{r.max_rel_error:.3g}",
            f"{r.top1_agreement:.4f}" if r.HasField("top1_agreement") else "-",
            f"{r.sample_items} {r.sample}",
            escape(r.server_id),
            time_text(r.time),
        )
    console.print(table)


@deploy_app.command("show")
def deploy_show(
    model: str, registry: RegistryOpt = DEFAULT_REGISTRY, as_json: JsonOpt = False, api_key: ApiKeyOpt = ""
) -> None:
    """A model's deployment, with the versions placed now and the proof of its setting."""

    async def show(s: _Stub, md: tuple[tuple[str, str], ...]) -> tuple[pb.GetDeploymentResponse, ProofRows]:
        response = await s.GetDeployment(pb.GetDeploymentRequest(model=model))
        return response, [] if as_json else await _proof_of(s, model, response.deployment)

    response, proof = _call(registry, api_key, show)
    if as_json:
        _print_json(response)
    else:
        _print_deployment(response.deployment)
        _print_proof(proof)


@deploy_app.command("set")
def deploy_set(
    model: str,
    pin: Annotated[
        list[int] | None,
        typer.Option(help="Version to keep loaded, repeatable (--reset pinned_versions unpins all)."),
    ] = None,
    replicas: Annotated[int | None, typer.Option(min=0, help="Model servers per version; 0: all.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:N or auto; '': the default.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, fp16 or bf16; '': the default.")] = None,
    optimization: Annotated[
        str | None, typer.Option(help="none, int8_dynamic, freeze or compile; '': none.")
    ] = None,
    max_abs_error: Annotated[
        float | None, typer.Option(min=0, help="Tolerance of an optimised load against fp32 eager.")
    ] = None,
    min_top1_agreement: Annotated[
        float | None, typer.Option(min=0, max=1, help="Tolerance: least top-1 agreement with fp32 eager.")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=0, help="0: the default.")] = None,
    max_queue_delay_ms: Annotated[float | None, typer.Option(min=0)] = None,
    max_queue_size: Annotated[int | None, typer.Option(min=0, help="0: the default.")] = None,
    instances: Annotated[int | None, typer.Option(min=0, help="0: the default.")] = None,
    preferred_batch_sizes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated batch sizes sent as soon as they fill, such as 8,16,32; '': none."
        ),
    ] = None,
    execution: Annotated[
        str | None, typer.Option(help="Where batches run: auto, loop (needs --instances 1) or thread.")
    ] = None,
    split: Annotated[
        list[str] | None,
        typer.Option(help="alias=weight, repeatable; weights sum to 100. --split '' clears the split."),
    ] = None,
    shadow: Annotated[
        str | None, typer.Option(help="Alias that gets a copy of traffic; '' removes the shadow.")
    ] = None,
    shadow_fraction: Annotated[float | None, typer.Option(min=0, max=1)] = None,
    reset: Annotated[
        list[str] | None,
        typer.Option(
            help="A setting to put back to its default, by its Deployment field name "
            "(pinned_versions, max_queue_delay_ms, traffic_split, ...), repeatable."
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Replace the whole deployment: every setting not given goes back to its default.",
        ),
    ] = False,
    expected_epoch: Annotated[
        int,
        typer.Option(
            min=0, help="Only if the model's epoch (`modelyard deploy show`) is still this one; 0: always."
        ),
    ] = 0,
    skip_proof: Annotated[
        bool,
        typer.Option(
            "--skip-proof",
            help="Change the device, precision or optimization without measuring the placed "
            "versions first (only the model servers' load-time gate checks the tolerance).",
        ),
    ] = False,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Change the settings given and keep every other one (the registry applies them as an
    update mask, in one transaction); --replace replaces the whole deployment. A change of
    device, precision or optimization under a tolerance is proven first (docs/migration.md):
    beyond the tolerance it is refused with the figures."""
    deployment = registry_pb2.Deployment()
    paths: list[str] = []

    def given(path: str) -> None:
        if path not in paths:
            paths.append(path)

    if pin is not None:
        deployment.pinned_versions.extend(pin)
        given("pinned_versions")
    scalars = {
        "replicas": replicas,
        "device": device,
        "precision": precision,
        "optimization": optimization,
        "max_abs_error": max_abs_error,
        "min_top1_agreement": min_top1_agreement,
        "max_batch_size": max_batch_size,
        "max_queue_size": max_queue_size,
        "instances": instances,
        "execution": execution,
        "shadow_alias": shadow,
        "shadow_fraction": shadow_fraction,
    }
    for path, value in scalars.items():
        if value is not None:
            setattr(deployment, path, value)
            given(path)
    if shadow == "":
        given("shadow_fraction")  # no shadow, so nothing mirrored to it either
    if max_queue_delay_ms is not None:
        deployment.max_queue_delay_ms = max_queue_delay_ms
        given("max_queue_delay_ms")
    if preferred_batch_sizes is not None:
        deployment.preferred_batch_sizes.extend(parse_batch_sizes(preferred_batch_sizes))
        given("preferred_batch_sizes")
    if split is not None:
        for item in split:
            if not item.strip():
                continue  # --split '': the split is cleared
            name, _, weight = item.partition("=")
            if not weight.isdigit():
                raise typer.BadParameter(f"--split {item!r}: expected alias=weight, such as production=90")
            deployment.traffic_split[name] = int(weight)
        given("traffic_split")
    for path in reset or []:
        if path in paths:
            raise typer.BadParameter(f"{path} is both given and reset", param_hint="--reset")
        given(path)
    if replace:
        paths = ["*"]
    elif not paths:
        raise typer.BadParameter(
            "nothing to change: give a setting (see --help), --reset FIELD, or --replace",
            param_hint="MODEL",
        )
    request = pb.SetDeploymentRequest(
        model=model,
        deployment=deployment,
        expected_epoch=expected_epoch,
        update_mask=field_mask_pb2.FieldMask(paths=paths),
        skip_proof=skip_proof,
    )

    async def set_it(s: _Stub, md: tuple[tuple[str, str], ...]) -> tuple[pb.SetDeploymentResponse, ProofRows]:
        response = await s.SetDeployment(request, metadata=md)
        return response, [] if as_json else await _proof_of(s, model, response.deployment)

    response, proof = _call(registry, api_key, set_it)
    if as_json:
        _print_json(response)
    else:
        _print_deployment(response.deployment)
        _print_proof(proof)


# -- audit ----------------------------------------------------------------------------------


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Only calls on this model.")] = "",
    actor: Annotated[str, typer.Option(help="Only calls by this actor.")] = "",
    method: Annotated[str, typer.Option(help="Only this method, e.g. SetAlias.")] = "",
    outcome: Annotated[str, typer.Option(help="Only this outcome: OK, ABORTED, ...")] = "",
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most entries to show.")] = 50,
    page_token: Annotated[str, typer.Option(help="Continue from a previous page.")] = "",
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """The audit log, newest first (needs the audit.read grant)."""
    if ctx.invoked_subcommand is not None:
        return
    request = pb.ListAuditEntriesRequest(
        model=model, actor=actor, method=method, outcome=outcome, page_size=limit, page_token=page_token
    )
    response = _call(registry, api_key, lambda s, md: s.ListAuditEntries(request, metadata=md))
    if as_json:
        _print_json(response)
        return
    table = Table("id", "when", "who", "method", "model", "target", "outcome", "message", "request id")
    for e in response.entries:
        style = "" if e.outcome == "OK" else "red"
        table.add_row(
            str(e.id),
            time_text(e.time),
            e.actor,
            e.method,
            e.model,
            e.target,
            f"[{style}]{e.outcome}[/]" if style else e.outcome,
            e.message,
            e.request_id,
        )
    console.print(table)
    if response.next_page_token:
        console.print(f"more: --page-token {response.next_page_token}")


@audit_app.command("verify")
def audit_verify(
    db: Annotated[
        Path | None,
        typer.Option(
            "--db",
            help="Check this registry SQLite file (opened read-only) instead of asking a running registry.",
        ),
    ] = None,
    expect_head: Annotated[
        str,
        typer.Option(
            "--expect-head",
            metavar="ID:HASH",
            help="A head printed by an earlier verify: catches a log cut short or rewritten whole.",
        ),
    ] = "",
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Check the audit log's hash chain; exit 1 naming the first entry tampered with.

    Names the lowest id that was edited, removed or reordered. An intact log prints its head
    (last id and hash): record it outside the cluster and pass it back with --expect-head.
    """
    head: audit_chain.Head | None = None
    if expect_head:
        try:
            head = audit_chain.Head.parse(expect_head)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--expect-head") from None
    entries = _read_audit_file(db) if db is not None else _fetch_audit(registry, api_key)
    report = audit_chain.verify_chain(entries, expected_head=head)
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        _print_verification(report, str(db) if db is not None else registry)
    if not report.intact:
        raise typer.Exit(1)


def _fetch_audit(registry: str, api_key: str) -> list[audit_chain.ChainEntry]:
    """Every entry, through ListAuditEntries (newest first, a page at a time)."""

    async def fetch(stub: _Stub, metadata: tuple[tuple[str, str], ...]) -> list[audit_chain.ChainEntry]:
        entries: list[audit_chain.ChainEntry] = []
        token = ""
        while True:
            response = await stub.ListAuditEntries(
                pb.ListAuditEntriesRequest(page_size=1000, page_token=token), metadata=metadata
            )
            entries.extend(audit_chain.entry_from_proto(e) for e in response.entries)
            token = response.next_page_token
            if not token:
                return entries

    return _call(registry, api_key, fetch)


def _read_audit_file(path: Path) -> list[audit_chain.ChainEntry]:
    """Every entry of a registry's SQLite file, opened read-only (a running registry's
    uncheckpointed writes included)."""
    if not path.is_file():
        Console(stderr=True).print(f"[red]no such file[/red]: {path}")
        raise typer.Exit(1)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            conn.row_factory = sqlite3.Row
            return [audit_chain.entry_from_row(dict(row)) for row in conn.execute("SELECT * FROM audit_log")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        Console(stderr=True).print(f"[red]cannot read the audit log of {path}[/red]: {exc}")
        raise typer.Exit(1) from None


def _print_verification(report: audit_chain.ChainReport, source: str) -> None:
    source = escape(source)  # "[::1]:50061" is not markup
    if report.problem is None:
        console.print(f"audit log of {source}: [green]intact[/green] ({report.entries} entries)")
    else:
        console.print(
            f"audit log of {source}: [red]TAMPERED[/red] at entry {report.problem.entry_id} "
            f"({report.problem.kind.value}): {escape(report.problem.message)}"
        )
    if report.not_covered:
        console.print(
            f"entries up to {report.not_covered_through} ({report.not_covered}) were recorded before "
            "the hash chain: not covered"
        )
    if report.head is None:
        console.print("head: none (no chained entry yet)")
    elif report.problem is not None:
        console.print(f"head: {report.head}")
    else:
        console.print(
            f"head: {report.head}\n"
            "record the head outside the cluster and pass it to --expect-head later: only that "
            "catches a log cut short or rewritten with every hash recomputed"
        )
