"""`modelyard top`: a live terminal view of the cluster, from the monitor, refreshed every second.

Usage::

    modelyard top                       # the monitor on 127.0.0.1:50071
    modelyard top --monitor host:50071 --interval 2
    modelyard top --once                # one frame, for scripts
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import grpc
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from modelyard.tls import open_channel
from modelyard.v1 import monitor_service_pb2 as pb
from modelyard.v1 import monitor_service_pb2_grpc as pb_grpc
from modelyard_cli.local_cluster import api_key_for, client_tls_for

__all__ = ["app", "render"]

app = typer.Typer(help="Live view of the cluster.")

_STATE_STYLE = {
    pb.SERVICE_STATE_UP: ("up", "green"),
    pb.SERVICE_STATE_DEGRADED: ("degraded", "yellow"),
    pb.SERVICE_STATE_DOWN: ("down", "red"),
}


def _ms(duration: object) -> str:
    if not getattr(duration, "ByteSize", lambda: 0)():
        return "-"
    return f"{duration.ToNanoseconds() / 1e6:.1f}"  # type: ignore[attr-defined]  # a protobuf Duration


def _bytes(n: float) -> str:
    """A byte count in binary units, one decimal (e.g. "1.5 GiB")."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _gpu_memory(process: pb.ProcessStats | None) -> str:
    """Allocated (and reserved, when it differs) GPU memory of a service's process, or "-"."""
    if process is None or not (process.gpu_memory_bytes or process.gpu_memory_reserved_bytes):
        return "-"
    allocated = _bytes(process.gpu_memory_bytes)
    if process.gpu_memory_reserved_bytes == process.gpu_memory_bytes:
        return allocated
    return f"{allocated} ({_bytes(process.gpu_memory_reserved_bytes)} resv)"


def _metrics(service: pb.ServiceStatus) -> str:
    """Where a service's /metrics is (scheme://host:port), or "-"."""
    if not service.metrics_address:
        return "-"
    return f"{service.metrics_scheme or 'http'}://{service.metrics_address}"


def _shadow(version: pb.VersionStats) -> RenderableType:
    """A shadow version's comparisons: mismatch rate, how many, and the largest difference."""
    if not version.HasField("shadow"):
        return "-"
    shadow = version.shadow
    if not shadow.comparisons:
        return Text(f"{shadow.errors} errors", style="yellow")
    diff = f" max|Δ| {shadow.max_abs_diff:.2e}" if shadow.HasField("max_abs_diff") else ""
    text = f"{shadow.mismatch_rate * 100:.0f}% of {shadow.comparisons}{diff}"
    return Text(text, style="red" if shadow.mismatches else "green")


def _since(ts: object, now: float) -> str:
    seconds = max(now - ts.ToNanoseconds() / 1e9, 0)  # type: ignore[attr-defined]  # a protobuf Timestamp
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def render(
    status: pb.GetClusterStatusResponse,
    stats: pb.GetModelStatsResponse,
    alerts: pb.ListAlertsResponse,
    *,
    now: float | None = None,
) -> Group:
    """One frame: services, model versions and firing alerts.

    The services table has a "gpu mem" column only when some process reports GPU memory; the
    models table has a "shadow" column only when some version was mirrored to in the window.
    """
    now = time.time() if now is None else now
    process_of = {sid: p for p in stats.processes for sid in p.service_ids}
    show_gpu = any(p.gpu_memory_bytes or p.gpu_memory_reserved_bytes for p in stats.processes)
    services = Table(title="services", expand=True, title_justify="left")
    for column in ("id", "kind", "address", "metrics", "state", "up for", "versions", "version"):
        services.add_column(column)
    if show_gpu:
        services.add_column("gpu mem", justify="right")
    for s in status.services:
        label, style = _STATE_STYLE.get(s.state, ("?", "white"))
        held = ", ".join(f"{v.model}:v{v.version}" for v in s.loaded_versions)
        kind = pb.ServiceKind.Name(s.kind).removeprefix("SERVICE_KIND_").lower()
        cells: list[RenderableType] = [
            s.id,
            kind,
            s.address,
            _metrics(s),
            Text(label, style=style),
            _since(s.start_time, now),
            held or "-",
            s.software_version,
        ]
        if show_gpu:
            cells.append(_gpu_memory(process_of.get(s.id)))
        services.add_row(*cells)

    show_shadow = any(v.HasField("shadow") for v in stats.versions)
    window = stats.window.ToNanoseconds() / 1e9 if stats.HasField("window") else 0
    models = Table(title=f"models (last {window:.0f}s)", expand=True, title_justify="left")
    for column in (
        "model",
        "ver",
        "aliases",
        "req/s",
        "errors",
        "p50 ms",
        "p99 ms",
        "queue ms",
        "compute ms",
        "batch",
        "depth",
        "ready",
        "drift",
        "psi",
        "drift p",
    ):
        models.add_column(column, justify="left" if column in ("model", "aliases") else "right")
    if show_shadow:
        models.add_column("shadow", justify="right")
    for v in stats.versions:
        errors = f"{v.error_rate * 100:.1f}%" if v.request_count else "-"
        row: list[RenderableType] = [
            v.model,
            str(v.version),
            ",".join(v.aliases) or "-",
            f"{v.requests_per_second:.1f}",
            Text(errors, style="red" if v.error_rate > 0.01 else ""),
            _ms(v.latency_p50),
            _ms(v.latency_p99),
            _ms(v.queue_time_mean),
            _ms(v.compute_time_mean),
            f"{v.batch_size_mean:.1f}" if v.batch_size_mean else "-",
            f"{v.queue_depth:.0f}",
            Text(str(v.replicas_ready), style="red" if v.aliases and not v.replicas_ready else ""),
            f"{v.input_drift:.2f}" if v.input_drift else "-",
            Text(f"{v.input_psi:.2f}", style="red" if v.input_psi > 0.25 else "") if v.input_psi else "-",
            (
                Text(f"{v.input_drift_p:.2g}", style="red" if v.input_drift_p < 0.001 else "")
                if v.HasField("input_drift_p")
                else "-"
            ),
        ]
        if show_shadow:
            row.append(_shadow(v))
        models.add_row(*row)

    # A no-data alert has fired and not resolved: it is listed with the firing ones.
    firing = [a for a in alerts.alerts if a.state in (pb.ALERT_STATE_FIRING, pb.ALERT_STATE_NO_DATA)]
    alert_table = Table(title=f"firing alerts ({len(firing)})", expand=True, title_justify="left")
    for column in ("alert", "state", "model", "version", "severity", "value", "summary", "for"):
        alert_table.add_column(column)
    for a in firing:
        no_data = a.state == pb.ALERT_STATE_NO_DATA
        alert_table.add_row(
            Text(a.name, style="bold red"),
            Text("no data", style="yellow") if no_data else "firing",
            a.labels.get("model", ""),
            a.labels.get("version", ""),
            a.labels.get("severity", ""),
            f"{a.value:.4g}",
            a.annotations.get("summary", ""),
            _since(a.fire_time, now),
        )
    return Group(services, models, alert_table)


async def _frame(stub: pb_grpc.MonitorServiceAsyncStub) -> Group:
    status, stats, alerts = await asyncio.gather(
        stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5),
        stub.GetModelStats(pb.GetModelStatsRequest(), timeout=5),
        stub.ListAlerts(pb.ListAlertsRequest(), timeout=5),
    )
    return render(status, stats, alerts)


async def _run(monitor: str, interval_s: float, once: bool, console: Console) -> None:
    async with open_channel(monitor, client_tls_for(monitor), token=api_key_for(monitor)) as channel:
        stub = pb_grpc.MonitorServiceStub(channel)
        if once:
            console.print(await _frame(stub))
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            while True:
                try:
                    live.update(await _frame(stub), refresh=True)
                except grpc.aio.AioRpcError as err:
                    live.update(
                        Text(f"monitor at {monitor}: {err.code().name}: {err.details()}", style="red"),
                        refresh=True,
                    )
                await asyncio.sleep(interval_s)


@app.command()
def top(
    monitor: Annotated[str, typer.Option(help="host:port of the monitor.")] = "127.0.0.1:50071",
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes.")] = 1.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
) -> None:
    """Live view of services, models, versions, traffic, p99, errors, queue depth and alerts."""
    console = Console()
    try:
        asyncio.run(_run(monitor, interval, once, console))
    except KeyboardInterrupt:
        pass
    except grpc.aio.AioRpcError as err:
        console.print(f"[red]monitor at {monitor}: {err.code().name}: {err.details()}[/]")
        raise typer.Exit(1) from None
