"""`python -m load_tests`: run a load-test scenario headless and gate it on its SLO.

A Typer sub-app, so it can also be mounted on the `modelyard` command.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from load_tests.runner import RunOptions, RunReport, ScenarioError, run_scenario
from load_tests.scenarios import SCENARIOS
from load_tests.slo import DEFAULT_SLO_FILE, load_slos
from load_tests.stages import format_stages, parse_duration_s
from modelyard.telemetry import configure_logging

__all__ = ["app"]

app = typer.Typer(help="Locust load tests with SLO gates.", no_args_is_help=True)
console = Console()

EXIT_SLO_MISSED = 1
EXIT_CANNOT_RUN = 2


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
            "-" if slo is None else (
                f"p99 ≤ {slo.p99_ms} ms, errors ≤ {slo.max_error_rate}, ≥ {slo.min_rps} req/s"),
            scenario.description,
        )
    console.print(table)


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(help=f"One of: {', '.join(SCENARIOS)}.")],
    host: Annotated[str, typer.Option(help="The gateway, HOST:PORT.")] = "127.0.0.1:50051",
    registry: Annotated[
        str, typer.Option(help="The registry, HOST:PORT (promote_rollback drives it).")
    ] = "127.0.0.1:50061",
    start_cluster: Annotated[
        bool, typer.Option(help="Start a local cluster on free ports for the run (the demo model).")
    ] = False,
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
    except KeyError:
        console.print(f"[red]error:[/] {slo_file} has no SLO for scenario {scenario!r}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    options = RunOptions(
        scenario=chosen,
        slo=slo,
        results_dir=results_dir or Path("var/load_tests") / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}",
        host=host,
        registry=registry,
        model=model,
        users=users or chosen.users,
        duration_s=duration_s,
        start_cluster=start_cluster,
    )
    console.print(f"scenario [bold]{scenario}[/]: {chosen.description}")
    try:
        report = asyncio.run(run_scenario(options))
    except ScenarioError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    _print_report(report)
    raise typer.Exit(0 if report.passed else EXIT_SLO_MISSED)


def _print_report(report: RunReport) -> None:
    for t_s, event in report.timeline:
        console.print(f"  t={t_s:6.2f}s  {event}")
    stats = report.stats
    table = Table(title=f"{report.scenario}: results in {report.results_dir}")
    for column in ("requests", "failed", "req/s", "p50 ms", "p99 ms", "max ms"):
        table.add_column(column, justify="right")
    table.add_row(str(stats.requests), str(stats.failures), f"{stats.rps:.1f}",
                  f"{stats.p50_ms:g}", f"{stats.p99_ms:g}", f"{stats.max_ms:.0f}")
    console.print(table)
    if report.served_versions:
        console.print("answers per version: " + ", ".join(
            f"v{v}: {n}" for v, n in report.served_versions.items()))
    if report.passed:
        console.print(f"[green]PASS[/]: scenario {report.scenario} met its SLO")
    else:
        for miss in report.misses:
            console.print(f"[red]FAIL[/]: {miss.message}")
