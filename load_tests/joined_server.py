"""The model server that the server_lost scenario kills: started by the runner for the run,
joined to the running cluster through the cluster's Redis, given the model's serving version,
SIGKILLed under load, and cleaned up on every way out. Nothing the user started is killed.

Joining works because placement is computed from membership: a model server that heartbeats
into the cluster's Redis is one more candidate for every placed version. A deployment with
`replicas: 0` (the default) already places the version on every model server; one with a
fixed number of replicas is set to 0 for the run through the registry and put back after.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import grpc
from prometheus_client.parser import text_string_to_metric_families

from load_tests.registry_actions import LOAD_TEST_CLIENT, get_deployment, set_deployment, spec_of
from modelyard.coordination import CoordinationStore, Deployment, ServiceRecord
from modelyard.errors import CoordinationUnavailable
from modelyard.membership import new_service_id
from modelyard.settings import RedisSettings
from modelyard.tls import ClientTLS, LocalCA, https_context, open_channel
from modelyard.v1 import registry_pb2
from modelyard_cli.processes import spawn_child

__all__ = ["JoinedModelServer", "JoinError", "pick_service_id"]

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUESTS_METRIC = "modelyard_model_server_requests"
"""The model server's counter of completed infer calls (model, version, code)."""
ID_ATTEMPTS = 200


class JoinError(RuntimeError):
    """The model server could not join the cluster, or could not be given the version."""


class JoinedModelServer:
    """One model server process of the runner's own, in someone else's cluster.

    Usage::

        server = JoinedModelServer(redis=settings, registry="127.0.0.1:50061", gateway=host,
                                   model="demo", log_path=results / "joined-model-server.log",
                                   token=api_key, secret_file=data_dir / "cluster.secret",
                                   note=clock.note)
        try:
            await server.join(version)           # placed, loaded, ready in membership
            ...                                  # wait until the gateway routes to it
            server.kill()                        # SIGKILL, under load
        finally:
            await server.aclose()                # process gone, record gone, deployment back

    Args:
        redis: The cluster's Redis (URL and key prefix); the server heartbeats into it.
        registry: The registry (`host:port`): the server downloads artifacts from it, and the
            runner changes the deployment through it when it must.
        gateway: The gateway the load goes through; the Redis must hold its membership record,
            so that a wrong `--redis-url` is caught before anything joins the wrong cluster.
        model: The model whose serving version the server must hold.
        log_path: The server's log.
        note: Called with one line per thing done to the cluster (the run's timeline).
        env: Extra environment for the server process.
        tls: The client TLS of a `modelyard up --tls` cluster: the runner dials the registry
            with it, and the server runs with the cluster's `model_server` certificate, found
            beside the CA (`LocalCA.issued_in`); None: plaintext.
        token: The API key (or the load tests' service token) the runner changes the
            deployment with; None: the cluster has access control off, and so does the server.
        secret_file: The cluster secret: the server proves itself a model server with it
            (downloading artifacts is internal to the cluster, and the gateway calls it with
            a service token); None: its certificate alone identifies it (TLS), or access
            control is off.
    """

    def __init__(
        self,
        *,
        redis: RedisSettings,
        registry: str,
        gateway: str,
        model: str,
        log_path: Path,
        note: Callable[[str], None],
        env: Mapping[str, str] | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
        secret_file: Path | None = None,
    ) -> None:
        self._tls = tls
        self._token = token
        self._secret_file = secret_file
        self._redis = redis
        self._registry = registry
        self._gateway = gateway
        self._model = model
        self._log_path = log_path
        self._note = note
        self._env = dict(env or {})
        self.service_id = ""
        self.address = ""
        self.metrics_address = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.killed = False
        self.cleanup_problems: list[str] = []
        """What `aclose` could not undo, one line each (empty: the cluster is as it was)."""
        self._log: IO[bytes] | None = None
        self._original: registry_pb2.Deployment | None = None
        self._ours: registry_pb2.Deployment | None = None

    async def join(self, version: int, *, timeout_s: float = 90.0) -> None:
        """Start the server in the cluster and wait until it reports `version` ready.

        Raises:
            JoinError: the Redis or the registry cannot be used, the Redis is not the gateway's
                cluster, no service id keeps the other models' placement as it is, the server
                exited, or it was not ready in time.
        """
        try:
            async with CoordinationStore(self._redis) as store:
                services = await store.list_services()
                self._check_same_cluster(services)
                live = [r.id for r in services if r.kind == "model_server" and not r.draining]
                await self._place_on_every_server()
                self.service_id = pick_service_id(
                    self._model, await store.all_aliases(), await store.all_deployments(), live
                )
                self._spawn()
                self._note(
                    f"started model server {self.service_id} (pid {self.pid}) to join the "
                    f"cluster's {len(live)} model server(s); it is the one that will be killed"
                )
                await self._wait_ready(store, version, timeout_s)
        except (CoordinationUnavailable, ValueError) as exc:
            raise JoinError(f"the cluster's Redis ({_redacted(self._redis.url)}): {exc}") from exc
        except grpc.aio.AioRpcError as exc:
            raise JoinError(f"the registry at {self._registry}: {exc.code().name}: {exc.details()}") from exc
        self._note(f"{self._model} v{version} is ready on {self.service_id} ({self.address})")

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    async def answered(self) -> int:
        """Calls for the model that this server answered with OK so far (its /metrics).

        Raises:
            JoinError: the metrics endpoint did not answer.
        """
        if not self.metrics_address:
            return 0
        scheme = "https" if self._tls else "http"
        url = f"{scheme}://{self.metrics_address}/metrics"
        context = https_context(self._tls) if self._tls else None
        try:
            text = await asyncio.to_thread(_fetch, url, context)
        except OSError as exc:  # urllib's URLError and timeouts are OSErrors
            raise JoinError(f"cannot read {url} of model server {self.service_id}: {exc}") from exc
        total = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != REQUESTS_METRIC:
                continue
            for sample in family.samples:
                if (
                    sample.name == f"{REQUESTS_METRIC}_total"
                    and sample.labels.get("model") == self._model
                    and sample.labels.get("code") == "OK"
                ):
                    total += sample.value
        return int(total)

    def kill(self) -> None:
        """SIGKILL the server (and anything in its process group): no drain, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            # Its own session (spawn_child), so its process group is its pid and holds only it.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.killed = True

    async def aclose(self) -> None:
        """Undo everything `join` did, whatever state it got to; idempotent.

        The process is killed first and synchronously, so that a second Ctrl-C during the
        rest cannot leave it running. Then its membership record goes (a killed server's
        record would linger until its TTL), then the deployment is put back. What cannot be
        undone is noted and kept in `cleanup_problems`.
        """
        self.kill()
        if self.process is not None:
            await asyncio.to_thread(self.process.wait)
        if self._log is not None:
            self._log.close()
            self._log = None
        await asyncio.shield(self._undo())

    async def _undo(self) -> None:
        if self.service_id:
            try:
                async with CoordinationStore(self._redis) as store:
                    await store.deregister(self.service_id)
                self._note(f"removed {self.service_id}'s membership record")
            except CoordinationUnavailable as exc:
                self._problem(
                    f"could not remove {self.service_id}'s membership record ({exc}); "
                    "it expires by itself within the heartbeat TTL"
                )
            self.service_id = ""
        if self._original is not None and self._ours is not None:
            original, ours = self._original, self._ours
            self._original = self._ours = None
            try:
                async with open_channel(
                    self._registry, self._tls, token=self._token, client=LOAD_TEST_CLIENT
                ) as channel:
                    now = await get_deployment(channel, self._model)
                    if spec_of(now) != ours:
                        self._problem(
                            f"the deployment of {self._model} changed during the run; left as it is "
                            f"(replicas {now.replicas}; it was {original.replicas} before the run)"
                        )
                        return
                    # Compare-and-set on the epoch just read: an operator's change that lands
                    # in between is kept (ABORTED), not overwritten.
                    restored = await set_deployment(channel, self._model, original, expected_epoch=now.epoch)
                self._note(
                    f"SetDeployment {self._model}: replicas back to {original.replicas} "
                    f"(epoch {restored.epoch})"
                )
            except grpc.aio.AioRpcError as exc:
                self._problem(
                    f"could not put the deployment of {self._model} back to replicas "
                    f"{original.replicas}: {exc.code().name}: {exc.details()}"
                )

    def _problem(self, message: str) -> None:
        log.warning("%s", message)
        self._note(message)
        self.cleanup_problems.append(message)

    def _check_same_cluster(self, services: list[ServiceRecord]) -> None:
        gateways = [r.address for r in services if r.kind == "gateway"]
        if _normalized(self._gateway) not in {_normalized(a) for a in gateways}:
            raise JoinError(
                f"the Redis at {_redacted(self._redis.url)} (key prefix {self._redis.key_prefix!r}) "
                f"is not the cluster of the gateway {self._gateway}: its gateways are {gateways or 'none'}; "
                "pass the cluster's Redis (--redis-url, or --cluster-file)"
            )

    async def _place_on_every_server(self) -> None:
        async with open_channel(
            self._registry, self._tls, token=self._token, client=LOAD_TEST_CLIENT
        ) as channel:
            current = await get_deployment(channel, self._model)
            if current.replicas == 0:
                return
            # A fixed replica count could leave the version off the new server, or move it
            # there from a server that keeps serving after the kill: every server holds it.
            ours = spec_of(current)
            ours.replicas = 0
            try:
                changed = await set_deployment(channel, self._model, ours, expected_epoch=current.epoch)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.ABORTED:
                    raise
                raise JoinError(
                    f"the deployment of {self._model} changed while this run was widening it "
                    "to every model server; nothing was changed, run the scenario again"
                ) from exc
        self._original, self._ours = spec_of(current), ours
        self._note(
            f"SetDeployment {self._model}: replicas {current.replicas} -> 0 (every model "
            f"server) for the run (epoch {changed.epoch}); put back afterwards"
        )

    def _spawn(self) -> None:
        prefix = "MODELYARD_MODEL_SERVER_"
        env = dict(os.environ)
        env.setdefault("MODELYARD_LOG_LEVEL", "WARNING")
        env.update(self._env)
        env.update(
            {
                f"{prefix}SERVICE_ID": self.service_id,
                f"{prefix}REDIS__URL": self._redis.url,
                f"{prefix}REDIS__KEY_PREFIX": self._redis.key_prefix,
                f"{prefix}SERVER__PORT": "0",
                f"{prefix}SERVER__METRICS_PORT": "0",
                f"{prefix}REGISTRY_ADDRESS": self._registry,
                **self._tls_env(prefix),
                **self._access_env(prefix),
                **{
                    f"{prefix}REDIS__{name.upper()}": str(path)
                    for name, path in (
                        ("tls_ca_file", self._redis.tls_ca_file),
                        ("tls_cert_file", self._redis.tls_cert_file),
                        ("tls_key_file", self._redis.tls_key_file),
                    )
                    if path is not None
                },
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
                ),
            }
        )
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self._log_path, "ab")  # noqa: SIM115 - closed in aclose()
        self.process = spawn_child([sys.executable, "-m", "model_server"], self._log, REPO_ROOT, env)

    def _access_env(self, prefix: str) -> dict[str, str]:
        """Access control as the cluster has it: with the cluster secret, enforced; with
        neither secret nor key, off (the gateway answered the runner's probe without a key);
        with a key but no secret (a TLS cluster), enforced on its certificate alone."""
        if self._secret_file is not None:
            return {
                f"{prefix}ACCESS__MODE": "enforce",
                f"{prefix}ACCESS__SERVICE_SECRET_FILE": str(self._secret_file),
            }
        return {f"{prefix}ACCESS__MODE": "enforce" if self._token else "off"}

    def _tls_env(self, prefix: str) -> dict[str, str]:
        if self._tls is None or self._tls.ca_file is None:
            return {}
        issued = LocalCA.issued_in(self._tls.ca_file.parent, "model_server")
        return {
            f"{prefix}TLS__ENABLED": "true",
            f"{prefix}TLS__CERT_FILE": str(issued.cert_file),
            f"{prefix}TLS__KEY_FILE": str(issued.key_file),
            f"{prefix}TLS__CA_FILE": str(self._tls.ca_file),
            f"{prefix}TLS__CLIENT_AUTH_REQUIRED": "true",
        }

    async def _wait_ready(self, store: CoordinationStore, version: int, timeout_s: float) -> None:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise JoinError(
                    f"model server {self.service_id} exited with status "
                    f"{self.process.returncode}; its log ({self._log_path}):\n{self._log_tail()}"
                )
            record = next((r for r in await store.list_services() if r.id == self.service_id), None)
            if record is not None:
                self.address, self.metrics_address = record.address, record.metrics_address
                held = [v for v in record.versions if v.model == self._model and v.version == version]
                if any(v.state == "ready" for v in held):
                    return
                failed = [v.error for v in held if v.state == "failed"]
                if failed:
                    raise JoinError(
                        f"model server {self.service_id} failed to load {self._model} v{version}: {failed[0]}"
                    )
            if loop.time() > deadline:
                raise JoinError(
                    f"{self._model} v{version} was not ready on model server "
                    f"{self.service_id} after {timeout_s:g}s; its log ({self._log_path}):\n"
                    f"{self._log_tail()}"
                )
            await asyncio.sleep(0.2)

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def pick_service_id(
    model: str,
    aliases: Mapping[str, tuple[Mapping[str, int], int]],
    deployments: Mapping[str, Deployment],
    live: list[str],
    *,
    attempts: int = ID_ATTEMPTS,
) -> str:
    """An id for the joining model server with which rendezvous placement puts no version of
    another model on it: a model with a fixed replica count must not have a version moved onto
    a server that is about to be killed (its old owner would unload it). `model` itself is
    placed on every server for the run, and models with `replicas: 0` gain a copy, lose none.

    Args:
        model: The model under test.
        aliases: model -> (alias -> version, epoch), as `CoordinationStore.all_aliases`.
        deployments: model -> Deployment, as `CoordinationStore.all_deployments`.
        live: Ids of the live model servers.
        attempts: Random ids to try.

    Raises:
        JoinError: every id tried would take a version of another model.
    """
    fixed: dict[tuple[str, int], int] = {}
    for other, deployment in deployments.items():
        if other == model or deployment.replicas <= 0:
            continue
        versions = set(deployment.placed_versions) or set(aliases.get(other, ({}, 0))[0].values())
        fixed.update({(other, v): deployment.replicas for v in versions})
    if not fixed:
        return new_service_id("model_server_load_test")
    # Imported only here: placement pulls in the model server's torch-based modules.
    from model_server.placement import owners

    for _ in range(attempts):
        candidate = new_service_id("model_server_load_test")
        servers = [*live, candidate]
        if not any(candidate in owners(m, v, servers, replicas) for (m, v), replicas in fixed.items()):
            return candidate
    raise JoinError(
        f"every service id tried would move versions of other models onto the model server that "
        f"the run kills ({len(fixed)} versions with a fixed replica count); run server_lost on a "
        "cluster of its own (--start-cluster)"
    )


def _fetch(url: str, context: ssl.SSLContext | None = None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as reply:  # noqa: S310 - a URL we built
        return str(reply.read().decode())


def _redacted(url: str) -> str:
    """`url` without its credentials, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _normalized(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{'127.0.0.1' if host in ('localhost', '[::1]', '::1') else host}:{port}"
