"""`modelyard optimize MODEL VERSION`: measure every optimisation profile on a model server,
record the reports in the registry, recommend the fastest within tolerance, and `--apply` it.

The model server (`--server`, default the local cluster's first, 127.0.0.1:50081) loads the
version under each profile on its own device and measures it against fp32 eager on the
version's baseline sample (`ModelServerService.EvaluateOptimizations`); what it serves does not
change. The reports go to the registry (`RecordOptimizationReports`; `modelyard models
versions` and GetModelVersion show them). Each profile is tried at each of `--precisions`
(default fp32). The recommendation is the profile and precision with the most
items/s at the largest batch among those within `--max-abs-error` / `--min-top1-agreement`
(default: the deployment's own tolerance). `--apply` sets the deployment's `optimization`
(and `precision` when the recommended one differs) through an update mask naming only those,
compare-and-set on the epoch read before measuring.

Wiring (in `modelyard_cli/app.py`)::

    app.command(name="optimize")(cli_optimize.optimize)
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import field_mask_pb2, json_format
from rich.table import Table

from modelyard.tls import open_channel
from modelyard.v1 import (
    model_server_service_pb2,
    model_server_service_pb2_grpc,
    registry_pb2,
    registry_service_pb2_grpc,
)
from modelyard.v1 import registry_service_pb2 as pb
from modelyard_cli import registry as cli_registry
from modelyard_cli.local_cluster import DEFAULT_PORTS, api_key_for, client_tls_for, tool_token_for
from modelyard_cli.registry import DEFAULT_REGISTRY, ApiKeyOpt, JsonOpt, RegistryOpt, call_registry

__all__ = ["optimize", "recommend", "within_tolerance"]

DEFAULT_SERVER = f"127.0.0.1:{DEFAULT_PORTS['model_server']}"
EVALUATE_TIMEOUT_S = 900.0
OPTIMIZE_CLIENT = "optimize"
"""The command's service-token kind on the local cluster (the model server's audit names it)."""
"""Compiling with AOTInductor takes minutes on a small CPU."""


def within_tolerance(
    report: registry_pb2.OptimizationReport, max_abs_error: float | None, min_top1: float | None
) -> bool:
    """Whether a measured report is within the tolerance (None: no limit); a refused one never is."""
    if report.error:
        return False
    if max_abs_error is not None and report.max_abs_error > max_abs_error:
        return False
    return not (
        min_top1 is not None and report.HasField("top1_agreement") and report.top1_agreement < min_top1
    )


def recommend(
    reports: list[registry_pb2.OptimizationReport], max_abs_error: float | None, min_top1: float | None
) -> tuple[str, str]:
    """(profile, precision) of the report with the most items/s at the largest batch within
    tolerance; ("none", "fp32") when nothing is."""
    fits = [r for r in reports if within_tolerance(r, max_abs_error, min_top1)]
    if not fits:
        return "none", "fp32"
    best = max(fits, key=lambda r: r.items_per_s_max_batch)
    return best.optimization, best.precision or "fp32"


def optimize(
    model: str,
    version: int,
    server: Annotated[
        str, typer.Option("--server", help="host:port of the model server that measures.")
    ] = DEFAULT_SERVER,
    profiles: Annotated[
        str, typer.Option(help="Comma-separated profiles to try; '': every one the server knows.")
    ] = "",
    max_abs_error: Annotated[
        float | None, typer.Option(min=0, help="Tolerance; default: the deployment's max_abs_error.")
    ] = None,
    min_top1_agreement: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="Tolerance; default: the deployment's min_top1_agreement."),
    ] = None,
    precisions: Annotated[
        str, typer.Option(help="Comma-separated precisions to try each profile at, such as fp32,bf16.")
    ] = "fp32",
    max_batch: Annotated[int, typer.Option(min=0, help="Largest batch measured; 0: the server's.")] = 0,
    apply: Annotated[
        bool, typer.Option("--apply", help="Set the recommended profile in the deployment.")
    ] = False,
    stored: Annotated[
        bool,
        typer.Option("--stored", help="Show the reports the registry holds instead of measuring."),
    ] = False,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
    api_key: ApiKeyOpt = "",
) -> None:
    """Measure each optimisation profile of a version, record and show the reports, and
    recommend the fastest one within tolerance."""
    wanted = [p.strip() for p in profiles.split(",") if p.strip()]

    async def run(channel: grpc.aio.Channel, md: Any) -> tuple[registry_pb2.Deployment, list[Any]]:
        stub = registry_service_pb2_grpc.RegistryServiceStub(channel)
        deployment = (await stub.GetDeployment(pb.GetDeploymentRequest(model=model))).deployment
        if stored:
            got = await stub.GetModelVersion(pb.GetModelVersionRequest(model=model, version=version))
            return deployment, list(got.model_version.optimization_reports)
        # EvaluateOptimizations is internal to the cluster: on the local cluster the command
        # calls it as its own tool (`service:optimize`, from the cluster secret); elsewhere
        # with the key given (a cluster whose model servers take it: access control off).
        token = tool_token_for(server, OPTIMIZE_CLIENT) or api_key or api_key_for(registry)
        async with open_channel(
            server, client_tls_for(registry), token=token, client="cli"
        ) as server_channel:
            evaluated = await model_server_service_pb2_grpc.ModelServerServiceStub(
                server_channel
            ).EvaluateOptimizations(
                model_server_service_pb2.EvaluateOptimizationsRequest(
                    model=model,
                    version=version,
                    optimizations=wanted,
                    precisions=[p.strip() for p in precisions.split(",") if p.strip()],
                    max_batch=max_batch,
                ),
                timeout=EVALUATE_TIMEOUT_S,
            )
        await stub.RecordOptimizationReports(
            pb.RecordOptimizationReportsRequest(model=model, version=version, reports=evaluated.reports)
        )
        return deployment, list(evaluated.reports)

    deployment, reports = call_registry(registry, api_key, run)
    abs_limit = max_abs_error
    if abs_limit is None and deployment.HasField("max_abs_error"):
        abs_limit = deployment.max_abs_error
    top1_limit = min_top1_agreement
    if top1_limit is None and deployment.HasField("min_top1_agreement"):
        top1_limit = deployment.min_top1_agreement
    best, best_precision = recommend(reports, abs_limit, top1_limit)
    # Only what differs is written: a profile alone changes `optimization` and nothing else.
    paths = [
        path
        for path, now, wanted_value in (
            ("optimization", deployment.optimization or "none", best),
            ("precision", deployment.precision or "fp32", best_precision),
        )
        if now != wanted_value
    ]
    applied = False
    if apply and paths:
        request = pb.SetDeploymentRequest(
            model=model,
            deployment=registry_pb2.Deployment(optimization=best, precision=best_precision),
            expected_epoch=deployment.epoch,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        call_registry(
            registry,
            api_key,
            lambda channel, md: registry_service_pb2_grpc.RegistryServiceStub(channel).SetDeployment(request),
        )
        applied = True
    if as_json:
        rows = []
        for r in reports:
            row = json_format.MessageToDict(
                r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
            )
            row["within_tolerance"] = within_tolerance(r, abs_limit, top1_limit)
            rows.append(row)
        answer = {
            "reports": rows,
            "recommended": best,
            "recommended_precision": best_precision,
            "applied": applied,
        }
        sys.stdout.write(json.dumps(answer, indent=2) + "\n")
        return
    console = cli_registry.console
    none = next(
        (r for r in reports if r.optimization == "none" and r.precision == "fp32" and not r.error), None
    )
    table = Table(
        "profile", "precision", "device", "max abs err", "max rel err", "top-1", "items/s b1",
        "items/s max", "×none", "load s", "ok", title=f"{model} v{version}",
    )  # fmt: skip
    for r in reports:
        if r.error:
            table.add_row(
                r.optimization, r.precision, r.device, "", "", "", "", "", "", "", f"[red]{r.error}[/red]"
            )
            continue
        ratio = r.items_per_s_max_batch / none.items_per_s_max_batch if none else 0.0
        table.add_row(
            r.optimization,
            r.precision,
            r.device,
            f"{r.max_abs_error:.2e}",
            f"{r.max_rel_error:.2e}",
            f"{r.top1_agreement:.4f}" if r.HasField("top1_agreement") else "-",
            f"{r.items_per_s_batch1:,.0f}",
            f"{r.items_per_s_max_batch:,.0f} (b{r.max_batch})",
            f"{ratio:.2f}" if none else "-",
            f"{r.load_time.ToTimedelta().total_seconds():.2f}",
            "yes" if within_tolerance(r, abs_limit, top1_limit) else "[yellow]beyond tolerance[/yellow]",
        )
    console.print(table)
    sample = next((r.sample for r in reports if r.sample), "")
    drawn = "the registered input baseline" if sample == "baseline" else "standard normal: no baseline"
    console.print(
        f"sample: {sample or '-'} ({drawn}); "
        f"tolerance: max_abs_error {abs_limit if abs_limit is not None else 'any'}, "
        f"min_top1_agreement {top1_limit if top1_limit is not None else 'any'}"
    )
    verb = "applied" if applied else "recommended"
    console.print(
        f"{verb}: [bold]{best}[/bold] at {best_precision}"
        + ("" if applied or not apply else " (already set)")
    )
