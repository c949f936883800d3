"""The load-test runner on a real cluster (child processes, embedded Redis, started the way
`modelyard up` starts it): short, tiny runs of the scenarios through the one command an SRE
types, server_lost joining and killing a model server of its own (and cleaning up after it,
Ctrl-C included), a run with an SLO the cluster cannot meet, the credentials a cluster with
access control wants (its API key, and its secret for what only its services may do), and the
SLO arithmetic on locust's statistics.

Runs are kept to a few seconds and two users: the point is that each scenario runs end to end
and gates on its SLO, not the numbers (those come from long runs on a quiet machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from load_tests.registry_actions import get_deployment, set_deployment, spec_of
from load_tests.runner import REPO_ROOT
from load_tests.scenarios import SCENARIOS
from load_tests.slo import DEFAULT_SLO_FILE, RunStats, Slo, check_slo, load_slos, read_stats
from load_tests.stages import Stage, parse_duration_s, parse_stages
from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings
from modelyard.tls import open_channel
from modelyard.v1 import registry_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1 import registry_service_pb2_grpc as reg_grpc
from modelyard_cli.demo import build_demo_model, demo_signature, register_model
from modelyard_cli.local_cluster import API_KEY_ENV, ClusterFile, LocalCluster

RUN_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One cluster (one model server, as `modelyard up`) with the demo model, shared by the
    module's runs.

    Started with asyncio.run: LocalCluster keeps no loop-bound state between start and stop,
    and the runs themselves are child processes.
    """
    local = LocalCluster(
        data_dir=tmp_path_factory.mktemp("load-cluster"), ports="free", env={"MODELYARD_LOG_LEVEL": "WARNING"}
    )
    try:
        asyncio.run(local.start())
        _module, artifact = build_demo_model()
        asyncio.run(
            register_model(
                local.address_of("registry"), "demo", artifact, demo_signature(), token=local.api_key
            )
        )
        yield local
    finally:
        asyncio.run(local.stop())


def _env(api_key: str | None = None) -> dict[str, str]:
    """The runner's environment: the key only when given (not one the developer has set)."""
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    env["COLUMNS"] = "200"  # rich wraps lines at the terminal width
    if api_key is not None:
        env[API_KEY_ENV] = api_key
    return env


def _run(*args: str, api_key: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "load_tests", "run", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=_env(api_key),
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
    done = _run(
        scenario,
        "--host",
        cluster.gateway_address,
        "--users",
        "2",
        "--duration",
        "3s",
        "--results-dir",
        str(results),
        api_key=cluster.api_key,
    )
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
    done = _run(
        "steady",
        "--host",
        cluster.gateway_address,
        "--users",
        "2",
        "--duration",
        "2s",
        "--slo-file",
        str(slo_file),
        "--api-key",
        str(cluster.api_key),
        "--results-dir",
        str(results),
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL: SLO p99_ms missed: p99 latency" in done.stdout
    assert "> 0.001 ms" in done.stdout
    summary = _summary(results)
    assert summary["passed"] is False
    assert [m["slo"] for m in summary["misses"]] == ["p99_ms"]  # type: ignore[union-attr,index]


@pytest.mark.integration
def test_promote_and_rollback_under_load_lose_no_request(cluster: LocalCluster, tmp_path: Path) -> None:
    results = tmp_path / "promote"
    done = _run(
        "promote_rollback",
        "--host",
        cluster.gateway_address,
        "--registry",
        cluster.address_of("registry"),
        "--secret-file",
        str(cluster.secret_file),
        "--users",
        "2",
        "--duration",
        "5s",
        "--results-dir",
        str(results),
        api_key=cluster.api_key,
    )
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

    # The registry names the load tests (their own service token), not the admin key.
    async def audit_and_history() -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
        async with open_channel(cluster.address_of("registry"), None, token=cluster.api_key) as channel:
            stub = reg_grpc.RegistryServiceStub(channel)
            audit = await stub.ListAuditEntries(reg.ListAuditEntriesRequest(model="demo", actor="load-test"))
            history = await stub.ListAliasHistory(reg.ListAliasHistoryRequest(model="demo", page_size=2))
        return [(e.actor, e.method) for e in audit.entries], [(e.actor, e.kind) for e in history.entries]

    audit, history = asyncio.run(audit_and_history())
    assert audit[:3] == [
        ("service:load-test", "RollbackAlias"),
        ("service:load-test", "PromoteVersion"),
        ("service:load-test", "UploadModelVersion"),
    ], audit
    assert history == [
        ("service:load-test", registry_pb2.ALIAS_MOVE_KIND_ROLLBACK),
        ("service:load-test", registry_pb2.ALIAS_MOVE_KIND_PROMOTE),
    ]


@pytest.mark.integration
def test_server_lost_needs_the_clusters_redis(tmp_path: Path) -> None:
    done = _run(
        "server_lost", "--host", "127.0.0.1:1", "--duration", "2s", "--results-dir", str(tmp_path / "lost")
    )
    assert done.returncode == 2
    assert "needs the cluster's Redis: pass --redis-url, or --cluster-file" in done.stdout


@pytest.mark.integration
def test_a_run_without_the_key_says_how_to_pass_one(cluster: LocalCluster, tmp_path: Path) -> None:
    done = _run(
        "steady", "--host", cluster.gateway_address, "--duration", "2s", "--results-dir", str(tmp_path)
    )
    assert done.returncode == 2, done.stdout + done.stderr
    message = " ".join(done.stdout.split())  # rich wraps long lines
    assert "UNAUTHENTICATED" in message
    assert f"set ${API_KEY_ENV} or pass --api-key" in message


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ["server_lost", "promote_rollback"])
def test_what_only_services_may_do_needs_the_cluster_secret(
    cluster: LocalCluster, tmp_path: Path, scenario: str
) -> None:
    # A key but no secret: server_lost's model server could not download the artifact, nor
    # take the gateway's calls, and promote_rollback could not copy it; refused up front.
    done = _run(
        scenario,
        "--host",
        cluster.gateway_address,
        "--registry",
        cluster.address_of("registry"),
        "--redis-url",
        cluster.redis_url,
        "--duration",
        "2s",
        "--results-dir",
        str(tmp_path / "lost"),
        api_key=cluster.api_key,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "needs the cluster secret: pass --secret-file" in " ".join(done.stdout.split())
    assert not (tmp_path / "lost" / "joined-model-server.log").exists()
    assert not (tmp_path / "lost" / "locust.log").exists()


@pytest.mark.integration
def test_server_lost_refuses_a_redis_of_another_cluster(
    cluster: LocalCluster, redis_url: str, tmp_path: Path
) -> None:
    # The session's Redis holds no gateway: nothing may join it, nothing is started.
    done = _run(
        "server_lost",
        "--host",
        cluster.gateway_address,
        "--registry",
        cluster.address_of("registry"),
        "--redis-url",
        redis_url,
        "--secret-file",
        str(cluster.secret_file),
        "--duration",
        "2s",
        "--results-dir",
        str(tmp_path / "lost"),
        api_key=cluster.api_key,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"is not the cluster of the gateway {cluster.gateway_address}" in done.stdout
    assert not (tmp_path / "lost" / "joined-model-server.log").exists()


def _pids_of_service(service_id: str) -> list[int]:
    """Processes (of this user) started with MODELYARD_MODEL_SERVER_SERVICE_ID=`service_id`."""
    wanted = f"MODELYARD_MODEL_SERVER_SERVICE_ID={service_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile, or not ours
    return pids


async def _model_servers(cluster: LocalCluster) -> set[str]:
    settings = RedisSettings(url=cluster.redis_url, key_prefix=cluster.key_prefix)
    async with CoordinationStore(settings) as store:
        return {r.id for r in await store.list_services() if r.kind == "model_server"}


@pytest.mark.integration
async def test_server_lost_joins_a_model_server_of_its_own_and_kills_it(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    # The path an SRE takes against `modelyard up`: no --start-cluster, the cluster file that
    # `up` writes. The deployment places the model on a fixed number of servers, so the
    # runner must widen it for the run (through the registry) and put it back.
    own_servers = await _model_servers(cluster)
    async with open_channel(cluster.address_of("registry"), None, token=cluster.api_key) as channel:
        before = await get_deployment(channel, "demo")
        fixed = spec_of(before)
        fixed.replicas = 1
        await set_deployment(channel, "demo", fixed)
    try:
        results = tmp_path / "lost"
        # 10 s: the kill is at a third, so the killed server's membership record expires
        # (heartbeat TTL 5 s) while the load still runs, and the cluster must ride that out too.
        done = await asyncio.to_thread(
            _run,
            "server_lost",
            "--cluster-file",
            str(cluster.cluster_file),
            "--users",
            "2",
            "--duration",
            "10s",
            "--results-dir",
            str(results),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "PASS: scenario server_lost met its SLO" in done.stdout
        summary = _summary(results)
        events = [e["event"] for e in summary["timeline"]]  # type: ignore[union-attr]
        assert "SetDeployment demo: replicas 1 -> 0" in " ".join(events), events
        routed = [e for e in events if e.startswith("the gateway routes to model-server-load-test-")]
        assert routed, events
        killed = [e for e in events if e.startswith("killed model-server-load-test-")]
        assert len(killed) == 1, events
        match = re.match(r"killed (\S+) \(pid (\d+),", killed[0])
        assert match is not None
        service_id, pid = match[1], int(match[2])
        assert any(e.startswith(f"removed {service_id}'s membership record") for e in events), events
        assert any(e.startswith("SetDeployment demo: replicas back to 1") for e in events), events
        stats = summary["stats"]
        assert isinstance(stats, dict) and stats["requests"] > 0
        # Nothing of the run is left: the process, its membership record; the cluster's own
        # services all still run, and the deployment is the user's again.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert _pids_of_service(service_id) == []
        assert await _model_servers(cluster) == own_servers
        assert cluster.check_alive() == []
        async with open_channel(cluster.address_of("registry"), None, token=cluster.api_key) as channel:
            assert (await get_deployment(channel, "demo")).replicas == 1
    finally:
        async with open_channel(cluster.address_of("registry"), None, token=cluster.api_key) as channel:
            await set_deployment(channel, "demo", before)


@pytest.mark.integration
async def test_server_lost_interrupted_leaves_nothing_behind(cluster: LocalCluster, tmp_path: Path) -> None:
    own_servers = await _model_servers(cluster)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "load_tests",
            "run",
            "server_lost",
            "--host",
            cluster.gateway_address,
            "--registry",
            cluster.address_of("registry"),
            "--redis-url",
            cluster.redis_url,
            "--secret-file",
            str(cluster.secret_file),
            "--users",
            "2",
            "--duration",
            "30s",
            "--results-dir",
            str(tmp_path / "lost"),
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(cluster.api_key),
    )
    try:
        # Ctrl-C once the joined server is a member of the cluster.
        deadline = time.monotonic() + 90
        joined: set[str] = set()
        while not joined:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the runner's model server never joined"
            await asyncio.sleep(0.2)
            joined = await _model_servers(cluster) - own_servers
        process.send_signal(signal.SIGINT)
        output, _ = await asyncio.to_thread(process.communicate, timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, output
    assert "interrupted" in output
    (service_id,) = joined
    assert _pids_of_service(service_id) == []
    assert await _model_servers(cluster) == own_servers
    assert cluster.check_alive() == []


def test_cluster_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    info = ClusterFile(
        pid=os.getpid(),
        redis_url="redis://127.0.0.1:1/0",
        key_prefix="my",
        services={"gateway": "127.0.0.1:2", "registry": "127.0.0.1:3"},
    )
    path.write_text(json.dumps(info.to_json()))
    assert ClusterFile.read(path) == info
    assert info.running()
    path.write_text(json.dumps({"pid": 1, "redis_url": "redis://x", "key_prefix": "my", "services": {}}))
    with pytest.raises(ValueError, match="no gateway address"):
        ClusterFile.read(path)


# -- the SLO arithmetic and the scenario definitions (pure) ----------------------------------


def test_every_scenario_has_an_slo_in_the_shipped_file() -> None:
    assert set(load_slos(DEFAULT_SLO_FILE)) == set(SCENARIOS)


def test_check_slo_names_every_missed_objective() -> None:
    stats = RunStats(requests=200, failures=3, rps=40.0, p50_ms=8.0, p99_ms=120.0, max_ms=300.0)
    misses = check_slo(Slo(p99_ms=100, max_error_rate=0.01, min_rps=50), stats)
    assert [m.slo for m in misses] == ["p99_ms", "max_error_rate", "min_rps"]
    assert misses[1].message == ("SLO max_error_rate missed: 3 of 200 requests failed (1.5000% > 1.0000%)")
    assert check_slo(Slo(p99_ms=120, max_error_rate=0.015, min_rps=40), stats) == []
    assert [m.slo for m in check_slo(Slo(), RunStats(0, 0, 0.0, 0.0, 0.0, 0.0))] == ["min_requests"]


def test_read_stats_aggregates_locust_final_statistics(tmp_path: Path) -> None:
    entry = {
        "name": "/modelyard.v1.InferenceService/Predict",
        "method": "grpc",
        "num_requests": 100,
        "num_failures": 1,
        "max_response_time": 250.5,
        "start_time": 1000.0,
        "last_request_timestamp": 1010.0,
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
