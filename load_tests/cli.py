"""`python -m load_tests`: run a load-test scenario headless and gate it on its SLO.

A Typer sub-app, so it can also be mounted on the `modelyard` command.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from load_tests.runner import RunOptions, RunReport, ScenarioError, run_scenario
from load_tests.scenarios import SCENARIOS
from load_tests.slo import DEFAULT_SLO_FILE, load_slos
from load_tests.stages import format_stages, parse_duration_s
from modelyard.settings import RedisSettings
from modelyard.telemetry import configure_logging
from modelyard_cli.local_cluster import API_KEY_ENV, CLUSTER_FILE_NAME, ClusterFile

__all__ = ["app"]

app = typer.Typer(help="Locust load tests with SLO gates.", no_args_is_help=True)
console = Console()

EXIT_SLO_MISSED = 1
EXIT_CANNOT_RUN = 2
EXIT_INTERRUPTED = 130
DEFAULT_HOST = "127.0.0.1:50051"
DEFAULT_REGISTRY = "127.0.0.1:50061"
DEFAULT_CLUSTER_FILE = Path("var") / CLUSTER_FILE_NAME
"""Where `modelyard up` run from the same directory with its default --data-dir describes itself."""


@app.command("list")
def list_scenarios(
    slo_file: Annotated[Path, typer.Option(help="SLO per scenario.")] = DEFAULT_SLO_FILE,
) -> None:
    """List the scenarios, their default load and their SLO."""
    slos = load_slos(slo_file)
    table = Table(title=f"load-test scenarios (SLO from {slo_file})")
    for column in ("scenario", "load", "SLO", "what"):
        table.add_column(column)
    for scenario in SCENARIOS.values():
        slo = slos.get(scenario.name)
        table.add_row(
            scenario.name,
            format_stages(scenario.stages(scenario.users, scenario.duration_s)),
            "-"
            if slo is None
            else (f"p99 ≤ {slo.p99_ms} ms, errors ≤ {slo.max_error_rate}, ≥ {slo.min_rps} req/s"),
            scenario.description,
        )
    console.print(table)


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help=f"One of: {', '.join(SCENARIOS)}.")],
    host: Annotated[
        str | None,
        typer.Option(
            help=f"The gateway, HOST:PORT (default: from the cluster file, else {DEFAULT_HOST}).",
            show_default=False,
        ),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(
            help="The registry, HOST:PORT, which promote_rollback and server_lost "
            f"drive (default: from the cluster file, else {DEFAULT_REGISTRY}).",
            show_default=False,
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="The cluster's Redis: server_lost joins a model server of its own "
            "through it (default: from the cluster file).",
            show_default=False,
        ),
    ] = None,
    cluster_file: Annotated[
        Path | None,
        typer.Option(
            help="What a running `modelyard up` wrote (DATA_DIR/cluster.json): "
            f"its gateway, registry and Redis (default without --host: "
            f"{DEFAULT_CLUSTER_FILE} if its `modelyard up` is running).",
            show_default=False,
        ),
    ] = None,
    start_cluster: Annotated[
        bool, typer.Option(help="Start a local cluster on free ports for the run (the demo model).")
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=API_KEY_ENV,
            help="The API key every call carries (the users', the probes', the registry's); "
            "better in the environment than on the command line (default: the admin key of the "
            "cluster file's cluster).",
            show_default=False,
        ),
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            help="The cluster secret (DATA_DIR/cluster.secret), for what only the cluster's "
            "services may do: server_lost's own model server, promote_rollback's copy of the "
            "artifact (default: from the cluster file).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="The model the users call.")] = "demo",
    users: Annotated[int | None, typer.Option(min=1, help="Users at the steady level.")] = None,
    duration: Annotated[str | None, typer.Option(help="Length of the run, e.g. 60s or 5m.")] = None,
    slo_file: Annotated[Path, typer.Option(help="SLO per scenario.")] = DEFAULT_SLO_FILE,
    results_dir: Annotated[
        Path | None, typer.Option(help="Where results go (default var/load_tests/SCENARIO-TIME).")
    ] = None,
) -> None:
    """Run one scenario; exit 1 when it misses its SLO, 2 when it cannot run."""
    configure_logging("WARNING")
    chosen = SCENARIOS.get(scenario)
    if chosen is None:
        console.print(f"[red]error:[/] unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
        raise typer.Exit(EXIT_CANNOT_RUN)
    try:
        slo = load_slos(slo_file)[scenario]
        duration_s = chosen.duration_s if duration is None else parse_duration_s(duration)
        info = None if start_cluster else _cluster_file(cluster_file, host=host)
    except KeyError:
        console.print(f"[red]error:[/] {slo_file} has no SLO for scenario {scenario!r}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    options = RunOptions(
        scenario=chosen,
        slo=slo,
        results_dir=results_dir or Path("var/load_tests") / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}",
        host=host or (info.gateway if info else DEFAULT_HOST),
        registry=registry or (info.registry if info else DEFAULT_REGISTRY),
        redis_url=redis_url or (info.redis_url if info else None),
        key_prefix=info.key_prefix if info else RedisSettings().key_prefix,
        model=model,
        users=users or chosen.users,
        duration_s=duration_s,
        start_cluster=start_cluster,
        tls=info.tls if info else None,
        redis_tls=info.redis_tls if info else None,
        api_key=api_key or _read(info.api_key_file if info else None),
        secret_file=secret_file or (info.secret_file if info else None),
    )
    console.print(f"scenario [bold]{scenario}[/]: {chosen.description}")
    try:
        report = asyncio.run(_interruptible(run_scenario(options)))
    except ScenarioError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print(
            "[red]interrupted[/]: the run stopped; what it started was stopped and undone "
            f"(see {options.results_dir})"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _print_report(report)
    raise typer.Exit(0 if report.passed else EXIT_SLO_MISSED)


def _read(path: Path | None) -> str | None:
    try:
        return path.read_text().strip() or None if path is not None else None
    except OSError:
        return None


def _cluster_file(path: Path | None, *, host: str | None) -> ClusterFile | None:
    """The cluster file to take addresses and credentials from: `path` (it must describe a
    running cluster); else the default one when it exists, its `modelyard up` still runs and,
    if the gateway was named, it names that gateway; else None.

    Raises:
        OSError, ValueError: `path` cannot be read, or its cluster is not running.
    """
    if path is None:
        if not DEFAULT_CLUSTER_FILE.exists():
            return None
        try:
            info = ClusterFile.read(DEFAULT_CLUSTER_FILE)
        except (OSError, ValueError):
            return None
        if not info.running():
            return None
        if host is not None and _loopback(host) not in {_loopback(a) for a in info.services.values()}:
            return None  # another cluster: its key and secret are not this one's
        console.print(f"cluster from {DEFAULT_CLUSTER_FILE}: gateway {info.gateway}")
        return info
    info = ClusterFile.read(path)
    if not info.running():
        raise ValueError(f"{path}: the `modelyard up` that wrote it (pid {info.pid}) is not running")
    return info


def _loopback(address: str) -> str:
    return address.replace("localhost:", "127.0.0.1:", 1)


async def _interruptible(run: Coroutine[Any, Any, RunReport]) -> RunReport:
    """Run `run`, cancelling it on SIGTERM as asyncio already does on Ctrl-C, so that its
    clean-up (locust, the server_lost model server, the deployment) happens either way."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _print_report(report: RunReport) -> None:
    for t_s, event in report.timeline:
        console.print(f"  t={t_s:6.2f}s  {event}")
    stats = report.stats
    table = Table(title=f"{report.scenario}: results in {report.results_dir}")
    for column in ("requests", "failed", "req/s", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    table.add_row(
        str(stats.requests),
        str(stats.failures),
        f"{stats.rps:.1f}",
        f"{stats.p50_ms:g}",
        f"{stats.p99_ms:g}",
        f"{stats.max_ms:.0f}",
    )
    console.print(table)
    if report.served_versions:
        console.print(
            "answers per version: " + ", ".join(f"v{v}: {n}" for v, n in report.served_versions.items())
        )
    if report.passed:
        console.print(f"[green]PASS[/]: scenario {report.scenario} met its SLO")
    else:
        for miss in report.misses:
            console.print(f"[red]FAIL[/]: {miss.message}")
