"""Run one scenario headless: optionally start a local cluster, make sure the model serves,
run locust in a child process for a bounded time while doing the scenario's action, then
check locust's statistics against the scenario's SLO.

The runner is plain asyncio; locust (gevent) runs in its own process, so the two event
models never share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from load_tests.joined_server import JoinedModelServer, JoinError
from load_tests.registry_actions import LOAD_TEST_CLIENT, copy_version, promote, rollback
from load_tests.scenarios import Action, Scenario
from load_tests.slo import RunStats, Slo, SloMiss, check_slo, read_stats
from load_tests.stages import format_stages
from modelyard.access.keys import ServiceTokens
from modelyard.settings import RedisSettings
from modelyard.tasks import cancel_task
from modelyard.tls import CLIENT_KIND, ClientTLS, open_channel
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import tensor_pb2
from modelyard_cli.local_cluster import API_KEY_ENV, LocalCluster, tool_token

__all__ = ["RunOptions", "RunReport", "run_scenario", "ScenarioError", "REPO_ROOT"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
# Locust starts, then stops its users, on top of the stages; past this it is killed.
LOCUST_GRACE_S = 60.0


class ScenarioError(RuntimeError):
    """The scenario could not run (as opposed to: it ran and missed its SLO)."""


@dataclass
class RunOptions:
    """Everything one run needs.

    Args:
        scenario: What to run.
        slo: What it must achieve.
        results_dir: Where locust's CSV and HTML report, the log and `summary.json` go.
        host: The gateway (`host:port`); ignored with `start_cluster`.
        registry: The registry (`host:port`), for promote_rollback and server_lost; ignored
            with `start_cluster`.
        redis_url: The cluster's Redis, for server_lost (its own model server joins the
            cluster through it); ignored with `start_cluster`.
        key_prefix: The prefix of the cluster's keys in that Redis.
        model: The model to call; with `start_cluster` the demo model is registered as it.
        alias: The alias the users select and promote_rollback moves.
        users: Users at the steady level.
        duration_s: The whole run.
        start_cluster: Start a `LocalCluster` (free ports, embedded Redis) for the run.
        tls: How to dial a TLS cluster (its CA and a client certificate; from the cluster
            file); None: plaintext.
        redis_tls: How to dial the cluster's `rediss://` Redis (from the cluster file).
        api_key: The API key every call carries (the users', the probes', the registry's).
        secret_file: The cluster secret, for what only the cluster's services may do:
            server_lost's own model server, promote_rollback's download of the artifact.
    """

    scenario: Scenario
    slo: Slo
    results_dir: Path
    host: str = "127.0.0.1:50051"
    registry: str = "127.0.0.1:50061"
    redis_url: str | None = None
    key_prefix: str = "my"
    model: str = "demo"
    alias: str = "production"
    users: int = 16
    duration_s: float = 60.0
    start_cluster: bool = False
    tls: ClientTLS | None = None
    redis_tls: ClientTLS | None = None
    api_key: str | None = None
    secret_file: Path | None = None


@dataclass
class RunReport:
    """What a run gave: the statistics, the SLO misses (empty: passed) and what happened."""

    scenario: str
    results_dir: Path
    stats: RunStats
    slo: Slo
    misses: list[SloMiss]
    timeline: list[tuple[float, str]] = field(default_factory=list)
    served_versions: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.misses

    def to_json(self) -> dict[str, object]:
        return {
            "scenario": self.scenario,
            "passed": self.passed,
            "stats": asdict(self.stats) | {"error_rate": self.stats.error_rate},
            "slo": asdict(self.slo),
            "misses": [asdict(m) for m in self.misses],
            "timeline": [{"t_s": round(t, 3), "event": e} for t, e in self.timeline],
            "served_versions": self.served_versions,
        }


class _Clock:
    """Seconds since the load started, and a timeline of what the runner did."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self.timeline: list[tuple[float, str]] = []

    def restart(self) -> None:
        """Count from now; what was noted so far gets negative times (before the load)."""
        shift = time.monotonic() - self._start
        self._start += shift
        self.timeline = [(t - shift, event) for t, event in self.timeline]

    def now(self) -> float:
        return time.monotonic() - self._start

    async def sleep_until(self, t_s: float) -> None:
        await asyncio.sleep(max(0.0, t_s - self.now()))

    def note(self, event: str) -> None:
        log.info("t=%.2fs %s", self.now(), event)
        self.timeline.append((self.now(), event))


async def run_scenario(options: RunOptions, cluster: LocalCluster | None = None) -> RunReport:
    """Run `options.scenario` and check it against `options.slo`.

    Args:
        options: The run.
        cluster: A started cluster that the caller owns (it is left running); its gateway,
            registry and Redis replace `options.host`, `options.registry` and
            `options.redis_url`. None: `options.start_cluster` decides.

    Raises:
        ScenarioError: the cluster, the model or locust was not usable; the message says why.
    """
    options.results_dir.mkdir(parents=True, exist_ok=True)
    owned: LocalCluster | None = None
    try:
        if cluster is None and options.start_cluster:
            # A fresh cluster per run: a registry or Redis left from an earlier run in the same
            # results dir would hold other versions and aliases.
            shutil.rmtree(options.results_dir / "cluster", ignore_errors=True)
            owned = cluster = LocalCluster(
                data_dir=options.results_dir / "cluster",
                ports="free",
                env={"MODELYARD_LOG_LEVEL": "WARNING"},
            )
            try:
                await cluster.start()
            except RuntimeError as exc:
                raise ScenarioError(f"the local cluster did not start: {exc}") from exc
            secret = cluster.secret_file if cluster.access == "enforce" else None
            await _register_demo(
                cluster.address_of("registry"),
                options.model,
                cluster.client_tls,
                tool_token(secret, LOAD_TEST_CLIENT) or cluster.api_key,
            )
        if cluster is not None:
            options.host = cluster.gateway_address
            options.registry = cluster.address_of("registry")
            options.key_prefix = cluster.key_prefix
            options.tls = cluster.client_tls
            options.redis_url = cluster.redis_url_of(CLIENT_KIND)
            options.redis_tls = cluster.redis_tls
            options.api_key = cluster.api_key
            options.secret_file = cluster.secret_file if cluster.access == "enforce" else None
        elif options.scenario.action is Action.KILL_MODEL_SERVER:
            if options.redis_url is None:
                raise ScenarioError(
                    f"scenario {options.scenario.name} joins a model server of its own to the cluster "
                    "(and kills it), so it needs the cluster's Redis: pass --redis-url, or "
                    "--cluster-file (`modelyard up` writes DATA_DIR/cluster.json), or --start-cluster"
                )
            if options.api_key and options.secret_file is None and options.tls is None:
                # Over plaintext only the cluster secret makes a model server one: without it
                # the registry refuses it the artifact and it refuses the gateway's calls.
                raise _needs_secret(options.scenario, "joins a model server of its own to")
        elif options.scenario.action is Action.PROMOTE_ROLLBACK:
            if options.api_key and options.secret_file is None:
                # DownloadModelVersion takes a service's token, never an API key.
                raise _needs_secret(options.scenario, "downloads the serving version's artifact from")
        return await _run(options, just_registered=cluster is not None)
    finally:
        if owned is not None:
            await owned.stop()


def _needs_secret(scenario: Scenario, does: str) -> ScenarioError:
    return ScenarioError(
        f"scenario {scenario.name} {does} a cluster with access control, which only the "
        "cluster's services may do, so it needs the cluster secret: pass --secret-file "
        "DATA_DIR/cluster.secret, or --cluster-file, or --start-cluster"
    )


def _registry_token(options: RunOptions) -> str | None:
    """What the runner calls the registry with: with the cluster secret, the load tests' own
    service token, so the audit log and the alias history name them (`service:load-test`);
    else the API key it was given (whose name the registry records)."""
    if options.secret_file is None:
        return options.api_key
    try:
        return tool_token(options.secret_file, LOAD_TEST_CLIENT)
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot use the cluster secret {options.secret_file}: {exc}") from exc


def _service_token(options: RunOptions) -> str | None:
    """What the runner downloads artifacts with: a model server's token from the cluster
    secret (DownloadModelVersion is internal to the cluster); None: access control off."""
    if options.secret_file is None:
        return None
    try:
        secret = options.secret_file.read_bytes().strip()
        return ServiceTokens(secret).token("model_server")
    except (OSError, ValueError) as exc:
        raise ScenarioError(f"cannot use the cluster secret {options.secret_file}: {exc}") from exc


async def _register_demo(
    registry: str, model: str, tls: ClientTLS | None = None, token: str | None = None
) -> None:
    # torch is only needed to build the demo model for a cluster the runner starts.
    from modelyard_cli.demo import build_demo_model, demo_signature, register_model

    _module, artifact = build_demo_model()
    await register_model(
        registry,
        model,
        artifact,
        demo_signature(),
        description="load-test demo model",
        tls=tls,
        token=token,
        client=LOAD_TEST_CLIENT,
    )


def _probe_request(model: str) -> inf.PredictRequest:
    return inf.PredictRequest(
        model=model,
        inputs=[
            tensor_pb2.Tensor(
                name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[1, 64], raw=bytes(4 * 64)
            )
        ],
    )


async def _serving_version(
    host: str,
    model: str,
    *,
    just_registered: bool,
    tls: ClientTLS | None = None,
    token: str | None = None,
    timeout_s: float = 60.0,
) -> int:
    """Wait (bounded) until the model answers through the gateway; return the serving version.

    UNAVAILABLE (still loading) is waited out; so is NOT_FOUND right after registering, while
    the alias event is on its way to the gateway.
    """
    retry = {grpc.StatusCode.UNAVAILABLE} | ({grpc.StatusCode.NOT_FOUND} if just_registered else set())
    request = _probe_request(model)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with open_channel(host, tls, token=token) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        while True:
            try:
                reply = await stub.Predict(request, timeout=10)
                return int(reply.version)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in retry or loop.time() > deadline:
                    raise ScenarioError(
                        f"model {model!r} does not answer at {host}: {exc.code().name}: "
                        f"{exc.details()} ({_hint(exc.code(), token)})"
                    ) from exc
            await asyncio.sleep(0.2)


def _hint(code: grpc.StatusCode, token: str | None) -> str:
    if code is grpc.StatusCode.UNAUTHENTICATED:
        if token is None:
            return (
                f"the cluster wants an API key: set ${API_KEY_ENV} or pass --api-key, or "
                "--cluster-file to call with its admin key"
            )
        return "the API key was refused: revoked, expired, or another cluster's"
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return "the API key lacks the grant named above: grant it, or use an admin key"
    return "start a cluster with `modelyard up --demo`, or pass --start-cluster"


async def _wait_routed(
    host: str,
    model: str,
    server: JoinedModelServer,
    tls: ClientTLS | None = None,
    token: str | None = None,
    timeout_s: float = 60.0,
) -> int:
    """Call the model through the gateway, a few calls at a time, until `server` has answered
    some of them: the gateway knows it and routes to it. Returns how many it answered.

    Concurrent calls, because a gateway that picks the replica with the fewest calls in flight
    may send one call at a time to the same replica for ever.
    """
    request = _probe_request(model)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with open_channel(host, tls, token=token) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        while True:
            # Failures are the load's business, not the probe's: only the count matters here.
            await asyncio.gather(
                *(stub.Predict(request, timeout=10) for _ in range(8)), return_exceptions=True
            )
            try:
                answered = await server.answered()
            except JoinError as exc:
                raise ScenarioError(str(exc)) from None
            if answered:
                return answered
            if loop.time() > deadline:
                raise ScenarioError(
                    f"the gateway at {host} sent none of its calls to model server "
                    f"{server.service_id} ({server.address}) within {timeout_s:g}s of it being ready"
                )
            await asyncio.sleep(0.2)


async def _run(options: RunOptions, *, just_registered: bool) -> RunReport:
    scenario = options.scenario
    clock = _Clock()
    old_version = await _serving_version(
        options.host, options.model, just_registered=just_registered, tls=options.tls, token=options.api_key
    )
    clock.note(f"{options.model} v{old_version} serves at {options.host}")

    victim: JoinedModelServer | None = None
    channel = open_channel(
        options.registry, options.tls, token=_registry_token(options), client=LOAD_TEST_CLIENT
    )
    try:
        if scenario.action is Action.KILL_MODEL_SERVER:
            assert options.redis_url is not None
            victim = JoinedModelServer(
                redis=RedisSettings(
                    url=options.redis_url,
                    key_prefix=options.key_prefix,
                    tls_ca_file=options.redis_tls.ca_file if options.redis_tls else None,
                    tls_cert_file=options.redis_tls.cert_file if options.redis_tls else None,
                    tls_key_file=options.redis_tls.key_file if options.redis_tls else None,
                ),
                registry=options.registry,
                gateway=options.host,
                model=options.model,
                log_path=options.results_dir / "joined-model-server.log",
                tls=options.tls,
                token=_registry_token(options),
                secret_file=options.secret_file,
                note=clock.note,
            )
            try:
                await victim.join(old_version)
            except JoinError as exc:
                raise ScenarioError(str(exc)) from None
            answered = await _wait_routed(options.host, options.model, victim, options.tls, options.api_key)
            clock.note(f"the gateway routes to {victim.service_id}: it answered {answered} probe calls")

        new_version = 0
        if scenario.action is Action.PROMOTE_ROLLBACK:
            async with open_channel(
                options.registry, options.tls, token=_service_token(options), client=LOAD_TEST_CLIENT
            ) as internal:
                new_version = await copy_version(channel, options.model, old_version, download=internal)
            clock.note(f"uploaded v{new_version} (a copy of v{old_version}), not yet loaded")

        stages = scenario.stages(options.users, options.duration_s)
        prefix = options.results_dir / scenario.name
        started = options.results_dir / "locust.started"
        served = options.results_dir / "served_versions.json"
        for stale in (started, served):
            stale.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "--host",
            options.host,
            "--csv",
            str(prefix),
            "--html",
            f"{prefix}_report.html",
            "--stages",
            format_stages(stages),
            "--model",
            options.model,
            "--alias",
            "" if options.alias == "production" else options.alias,
            "--served-versions-file",
            str(served),
            "--started-file",
            str(started),
            "--json-file",
            str(prefix),
            "--only-summary",
            "--loglevel",
            "INFO",
            "--exit-code-on-error",
            "0",
            scenario.user_class,
        ]
        total_s = sum(s.duration_s for s in stages)
        action_error: BaseException | None = None
        with (options.results_dir / "locust.log").open("wb") as locust_log:
            env = dict(
                os.environ,
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])),
                **(options.tls.to_env() if options.tls else {}),
                **({API_KEY_ENV: options.api_key} if options.api_key else {}),
            )
            process = await asyncio.create_subprocess_exec(
                *args,
                cwd=REPO_ROOT,
                env=env,
                stdout=locust_log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                await _wait_started(process, started, options.results_dir / "locust.log")
                clock.restart()
                clock.note(f"load started: {format_stages(stages)} of {scenario.user_class}")
                action = asyncio.create_task(_act(options, victim, channel, clock, old_version, new_version))
                try:
                    async with asyncio.timeout(total_s + LOCUST_GRACE_S):
                        await process.wait()
                except TimeoutError:
                    raise ScenarioError(
                        f"locust did not stop within {total_s + LOCUST_GRACE_S:.0f}s; killed it"
                    ) from None
                finally:
                    clock.note("load stopped")
                    if not action.done():
                        action_error = ScenarioError(
                            f"the {scenario.action.value} action did not finish while the load ran "
                            f"({total_s:g}s); run longer (--duration)"
                        )
                    await cancel_task(action)
                if action_error is None and not action.cancelled():
                    action_error = action.exception()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        await channel.close()
        if victim is not None:
            # Also on Ctrl-C (the task is cancelled) and on every error above.
            await victim.aclose()

    stats_json = Path(f"{prefix}.json")
    if not stats_json.exists():
        raise ScenarioError(
            f"locust wrote no statistics (exit status {process.returncode}); see "
            f"{options.results_dir / 'locust.log'}"
        )
    stats = read_stats(stats_json)
    misses = check_slo(options.slo, stats)
    served_versions: dict[str, int] = json.loads(served.read_text()) if served.exists() else {}
    if action_error is not None:
        message = (
            action_error.details() if isinstance(action_error, grpc.aio.AioRpcError) else str(action_error)
        )
        misses.append(SloMiss("action", f"scenario action {scenario.action.value} failed: {message}"))
    if scenario.action is Action.PROMOTE_ROLLBACK and action_error is None:
        # The versions that actually answered prove the flip reached the callers both ways.
        missing = [v for v in (old_version, new_version) if not served_versions.get(str(v))]
        if missing:
            misses.append(
                SloMiss(
                    "versions_served",
                    f"SLO versions_served missed: no request was answered by v{missing[0]} "
                    f"(answers per version: {served_versions})",
                )
            )
    if victim is not None:
        misses.extend(SloMiss("cleanup", f"cleanup incomplete: {p}") for p in victim.cleanup_problems)
    report = RunReport(
        scenario.name, options.results_dir, stats, options.slo, misses, clock.timeline, served_versions
    )
    (options.results_dir / "summary.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


async def _wait_started(process: asyncio.subprocess.Process, started: Path, log_path: Path) -> None:
    deadline = time.monotonic() + 60.0
    while not started.exists():
        if process.returncode is not None:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
            raise ScenarioError(f"locust exited with status {process.returncode} before starting:\n{tail}")
        if time.monotonic() > deadline:
            raise ScenarioError("locust did not start within 60s")
        # Poll: the marker is written by another process, and waiting on the child covers exit.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05):
                await process.wait()


async def _act(
    options: RunOptions,
    victim: JoinedModelServer | None,
    channel: grpc.aio.Channel,
    clock: _Clock,
    old_version: int,
    new_version: int,
) -> None:
    duration = options.duration_s
    action = options.scenario.action
    if action is Action.PROMOTE_ROLLBACK:
        await clock.sleep_until(duration * 0.2)
        clock.note(f"PromoteVersion {options.alias} -> v{new_version}")
        promoted = await promote(
            channel,
            options.model,
            options.alias,
            new_version,
            expected=old_version,
            ready_timeout_s=duration * 0.5,
        )
        clock.note(
            f"promoted: {options.alias} = v{promoted.alias.version} "
            f"(ready on {promoted.ready_replicas} model server(s))"
        )
        await clock.sleep_until(duration * 0.6)
        clock.note(f"RollbackAlias {options.alias}")
        rolled = await rollback(channel, options.model, options.alias, expected=new_version)
        clock.note(f"rolled back: {options.alias} = v{rolled.alias.version}")
    elif action is Action.KILL_MODEL_SERVER:
        assert victim is not None
        await clock.sleep_until(duration * 0.33)
        try:
            answered = str(await victim.answered())
        except JoinError:
            answered = "an unknown number of"  # its metrics are not the point: kill it anyway
        victim.kill()
        clock.note(
            f"killed {victim.service_id} (pid {victim.pid}, {victim.address}) with SIGKILL; "
            f"it had answered {answered} calls"
        )
