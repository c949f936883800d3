"""The load-test runner on a real cluster (child processes, embedded Redis): short, tiny runs
of the scenarios through the one command an SRE types, a run with an SLO the cluster cannot
meet, and the SLO arithmetic on locust's statistics.

Runs are kept to a few seconds and two users: the point is that each scenario runs end to end
and gates on its SLO, not the numbers (those come from long runs on a quiet machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.runner import REPO_ROOT, RunOptions, run_scenario
from load_tests.scenarios import SCENARIOS
from load_tests.slo import DEFAULT_SLO_FILE, RunStats, Slo, check_slo, load_slos, read_stats
from load_tests.stages import Stage, parse_duration_s, parse_stages
from modelyard.demo import build_demo_model, demo_signature, register_model
from modelyard.local_cluster import LocalCluster

RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster (two model servers) with the demo model, shared by the module's runs.

    Started with asyncio.run: LocalCluster keeps no loop-bound state between start and stop,
    and the runs themselves are child processes.
    """
    local = LocalCluster(data_dir=tmp_path_factory.mktemp("load-cluster"), ports="free",
                         model_servers=2, env={"MODELYARD_LOG_LEVEL": "WARNING"})
    try:
        asyncio.run(local.start())
        _module, artifact = build_demo_model()
        asyncio.run(register_model(local.address_of("registry"), "demo", artifact, demo_signature()))
        yield local
    finally:
        asyncio.run(local.stop())


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "load_tests", "run", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
        env=dict(os.environ, COLUMNS="200"),  # rich wraps lines at the terminal width
    )


def _summary(results: Path) -> dict[str, object]:
    summary: dict[str, object] = json.loads((results / "summary.json").read_text())
    return summary


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ["steady", "oip"])
def test_scenario_passes_and_writes_locust_reports(
    cluster: LocalCluster, tmp_path: Path, scenario: str
) -> None:
    results = tmp_path / scenario
    done = _run(scenario, "--host", cluster.gateway_address, "--users", "2", "--duration", "3s",
                "--results-dir", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"PASS: scenario {scenario} met its SLO" in done.stdout
    summary = _summary(results)
    assert summary["passed"] is True
    stats = summary["stats"]
    assert isinstance(stats, dict) and stats["requests"] > 0 and stats["failures"] == 0
    for name in (f"{scenario}_stats.csv", f"{scenario}_failures.csv", f"{scenario}_report.html"):
        assert (results / name).stat().st_size > 0, name
    method = "ModelInfer" if scenario == "oip" else "Predict"
    assert method in (results / f"{scenario}_stats.csv").read_text()


@pytest.mark.integration
def test_impossible_slo_fails_with_a_message_naming_it(cluster: LocalCluster, tmp_path: Path) -> None:
    slo_file = tmp_path / "slo.yaml"
    slo_file.write_text("steady:\n  p99_ms: 0.001\n  max_error_rate: 0\n  min_rps: 1\n")
    results = tmp_path / "tight"
    done = _run("steady", "--host", cluster.gateway_address, "--users", "2", "--duration", "2s",
                "--slo-file", str(slo_file), "--results-dir", str(results))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL: SLO p99_ms missed: p99 latency" in done.stdout
    assert "> 0.001 ms" in done.stdout
    summary = _summary(results)
    assert summary["passed"] is False
    assert [m["slo"] for m in summary["misses"]] == ["p99_ms"]  # type: ignore[union-attr,index]


@pytest.mark.integration
def test_promote_and_rollback_under_load_lose_no_request(cluster: LocalCluster, tmp_path: Path) -> None:
    results = tmp_path / "promote"
    done = _run("promote_rollback", "--host", cluster.gateway_address,
                "--registry", cluster.address_of("registry"), "--users", "2", "--duration", "5s",
                "--results-dir", str(results))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = _summary(results)
    stats = summary["stats"]
    assert isinstance(stats, dict) and stats["failures"] == 0 and stats["requests"] > 0
    events = [e["event"] for e in summary["timeline"]]  # type: ignore[union-attr]
    assert any(e.startswith("promoted: production = v") for e in events), events
    assert any(e.startswith("rolled back: production = v") for e in events), events
    # Both the promoted copy and the original answered: the flips reached the callers.
    served = summary["served_versions"]
    assert isinstance(served, dict) and len(served) >= 2, served


@pytest.mark.integration
def test_server_lost_needs_a_cluster_the_runner_owns(tmp_path: Path) -> None:
    done = _run("server_lost", "--host", "127.0.0.1:1", "--duration", "2s",
                "--results-dir", str(tmp_path / "lost"))
    assert done.returncode == 2
    assert "pass --start-cluster" in done.stdout


@pytest.mark.integration
async def test_server_lost_kills_one_of_two_model_servers_under_load(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    # In-process, on the module's cluster (the CLI only kills servers of a cluster it started
    # itself). The other tests pass whichever order they run in: one model server is enough.
    options = RunOptions(scenario=SCENARIOS["server_lost"], slo=load_slos()["server_lost"],
                         results_dir=tmp_path / "lost", users=2, duration_s=4.0)
    report = await run_scenario(options, cluster)
    assert report.passed, report.misses
    assert report.stats.requests > 0
    killed = [e for _, e in report.timeline if e.startswith("killed model-server-")]
    assert len(killed) == 1, report.timeline
    assert [c.name for c in cluster.check_alive()] == [killed[0].split()[1]]
    assert (tmp_path / "lost" / "server_lost_report.html").exists()


# -- the SLO arithmetic and the scenario definitions (pure) ----------------------------------


def test_every_scenario_has_an_slo_in_the_shipped_file() -> None:
    assert set(load_slos(DEFAULT_SLO_FILE)) == set(SCENARIOS)


def test_check_slo_names_every_missed_objective() -> None:
    stats = RunStats(requests=200, failures=3, rps=40.0, p50_ms=8.0, p99_ms=120.0, max_ms=300.0)
    misses = check_slo(Slo(p99_ms=100, max_error_rate=0.01, min_rps=50), stats)
    assert [m.slo for m in misses] == ["p99_ms", "max_error_rate", "min_rps"]
    assert misses[1].message == (
        "SLO max_error_rate missed: 3 of 200 requests failed (1.5000% > 1.0000%)")
    assert check_slo(Slo(p99_ms=120, max_error_rate=0.015, min_rps=40), stats) == []
    assert [m.slo for m in check_slo(Slo(), RunStats(0, 0, 0.0, 0.0, 0.0, 0.0))] == ["min_requests"]


def test_read_stats_aggregates_locust_final_statistics(tmp_path: Path) -> None:
    entry = {
        "name": "/modelyard.v1.InferenceService/Predict", "method": "grpc",
        "num_requests": 100, "num_failures": 1, "max_response_time": 250.5,
        "start_time": 1000.0, "last_request_timestamp": 1010.0,
        "response_times": {"5": 90, "20": 9, "250": 1},
    }
    path = tmp_path / "stats.json"
    path.write_text(json.dumps([entry]))
    stats = read_stats(path)
    assert (stats.requests, stats.failures, stats.rps) == (100, 1, 10.0)
    # Locust's percentile: the 99th of 100 answers is the slowest one.
    assert (stats.p50_ms, stats.p99_ms, stats.max_ms) == (5.0, 250.0, 250.5)


def test_stages_and_spike_shape() -> None:
    assert parse_stages("10s:8@8, 1.5m:32@16") == [Stage(10.0, 8, 8.0), Stage(90.0, 32, 16.0)]
    assert parse_duration_s("500ms") == 0.5
    with pytest.raises(ValueError, match="DURATION:USERS@SPAWN_RATE"):
        parse_stages("10s:8")
    spike = SCENARIOS["spike"].stages(8, 10.0)
    assert [s.users for s in spike] == [8, 32, 8]
    assert sum(s.duration_s for s in spike) == pytest.approx(10.0)
