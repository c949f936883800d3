"""A whole cluster on one machine as supervised child processes: what `modelyard up` runs
and what the e2e tests drive.

Redis (embedded unless a URL is given) → registry → monitor → model servers → gateway. Each
child is told its service id; the supervisor finds its address in Redis membership (so port 0
works) and waits until its grpc.health.v1 says SERVING. Stopping goes in reverse order.

A started cluster describes itself in `DATA_DIR/cluster.json` (`ClusterFile`): the addresses
of its services and the URLs of their Prometheus `/metrics` (each as the service registered
it: with `--free-ports` on a free port, not the gRPC port + 1000), its Redis URL and key
prefix, and the pid of the process that supervises it.
Tools that act on a running `modelyard up` read it (the load tests' `server_lost` joins a model
server of its own through the Redis it names). The file is removed when the cluster stops.

With `tls=True` the cluster makes a local CA and one certificate per service kind in
`DATA_DIR/tls` (the CA is kept across restarts, the certificates are renewed when they near
expiry), starts every service with mTLS, checks readiness over mTLS, and records in the
cluster file what a client needs (`tls`: the CA file and a `client` certificate). The CLI,
`modelyard top` and the load tests pick these up (`client_tls_for`). The embedded Redis then
serves TLS only (client certificates required) with one ACL user per service kind, each
with its own random password and access to the cluster's keys and channels only; the cluster
file's Redis URL is the `client` user's, and `redis_tls` names the files to dial it with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelyard.access.keys import ServiceTokens
from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.membership import new_service_id
from modelyard.settings import RedisSettings
from modelyard.tls import (
    CLIENT_KIND,
    SERVICE_KINDS,
    ClientTLS,
    LocalCA,
    certificate_expiry,
    open_channel,
    write_private,
)
from modelyard_cli.embedded_redis import RedisServer, RedisServerTLS
from modelyard_cli.processes import spawn_child

__all__ = [
    "LocalCluster",
    "Child",
    "ClusterFile",
    "DEFAULT_PORTS",
    "CLUSTER_FILE_NAME",
    "CLUSTER_FILE_ENV",
    "client_tls_for",
    "api_key_for",
    "tool_token",
    "tool_token_for",
    "API_KEY_ENV",
]

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"gateway": 50051, "registry": 50061, "monitor": 50071, "model_server": 50081}
CLUSTER_FILE_NAME = "cluster.json"
"""What a started cluster writes into its data dir (see `ClusterFile`)."""
CLUSTER_FILE_ENV = "MODELYARD_CLUSTER_FILE"
"""Where clients (the CLI, `modelyard top`) look for the cluster file; unset: var/cluster.json."""
QUICK_EXIT_S = 10.0
"""A child that dies within this long of its start counts as failing at start-up."""
MAX_QUICK_FAILURES = 5
"""The supervisor gives up (the cluster stops) when a child fails at start-up this many
times in a row; any other death is restarted, however often."""
RESTART_BACKOFF_S = (0.5, 30.0)
"""First and longest wait before a dead child is started again (doubling in between)."""
RENEW_BEFORE_S = 30 * 24 * 3600.0
"""Certificates of a local TLS cluster are issued again when they expire within this long."""


@dataclass
class Child:
    """One service process of the cluster."""

    name: str
    kind: str
    module: str
    env: dict[str, str]
    log_path: Path
    service_id: str
    process: subprocess.Popen[bytes] | None = None
    address: str = ""
    metrics_url: str = ""
    """Its Prometheus endpoint (`scheme://host:port/metrics`), from its membership record."""
    started_at: float = 0.0
    """Monotonic time its current process was started."""
    restarts: int = 0
    """Times the supervisor started it again after it died."""
    quick_failures: int = 0
    """Deaths in a row, each within `QUICK_EXIT_S` of its start."""
    restart_at: float | None = None
    """When the supervisor starts it again (None: it is not waiting for a restart)."""
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass(frozen=True)
class ClusterFile:
    """What a running local cluster says about itself in `DATA_DIR/cluster.json`.

    Usage::

        info = ClusterFile.read(Path("var/cluster.json"))
        if info.running():
            print(info.gateway, info.redis_url)

    Args:
        pid: The process that supervises the cluster (`modelyard up`).
        redis_url: The cluster's Redis; every service coordinates through it.
        key_prefix: The prefix of the cluster's keys in that Redis.
        services: Service name (`gateway`, `registry`, `monitor`, `model-server-1`, ...) to the
            `host:port` of its gRPC listener.
        tls: What a client dials the cluster's services with when they serve TLS (the CA and
            a client certificate); None: plaintext.
        redis_tls: What a client dials the cluster's `rediss://` Redis with; None: plaintext.
        api_key_file: The admin API key the registry made on the cluster's first start
            (owner-only); the CLI, `modelyard top` and the load tests call with it.
        secret_file: The cluster secret (owner-only), for tools that join a service of their
            own to the cluster (the load tests' `server_lost` model server).
        metrics: Service name to the URL of its Prometheus endpoint
            (`http[s]://host:port/metrics`, HTTPS when the cluster's TLS is on).
    """

    pid: int
    redis_url: str
    key_prefix: str
    services: dict[str, str]
    tls: ClientTLS | None = None
    redis_tls: ClientTLS | None = None
    api_key_file: Path | None = None
    secret_file: Path | None = None
    metrics: dict[str, str] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.services["gateway"]

    @property
    def registry(self) -> str:
        return self.services["registry"]

    def redis_settings(self) -> RedisSettings:
        """How to reach the cluster's Redis (TLS files included)."""
        return _redis_settings(self.redis_url, self.key_prefix, self.redis_tls)

    def running(self) -> bool:
        """Whether the process that wrote the file still exists (a killed `modelyard up`
        leaves its file behind)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # it exists, under another user
        return True

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "v": 1,
            "pid": self.pid,
            "redis_url": self.redis_url,
            "key_prefix": self.key_prefix,
            "services": self.services,
            "metrics": self.metrics,
        }
        if self.tls is not None:
            data["tls"] = self.tls.to_json()
        if self.redis_tls is not None:
            data["redis_tls"] = self.redis_tls.to_json()
        if self.api_key_file is not None:
            data["api_key_file"] = str(self.api_key_file)
        if self.secret_file is not None:
            data["secret_file"] = str(self.secret_file)
        return data

    @classmethod
    def read(cls, path: Path) -> ClusterFile:
        """Read a cluster file.

        Raises:
            OSError: it cannot be read.
            ValueError: it is not a cluster file.
        """
        try:
            data = json.loads(path.read_text())
            info = cls(
                pid=int(data["pid"]),
                redis_url=str(data["redis_url"]),
                key_prefix=str(data["key_prefix"]),
                services={str(k): str(v) for k, v in data["services"].items()},
                tls=ClientTLS.from_json(data["tls"]) if data.get("tls") else None,
                redis_tls=ClientTLS.from_json(data["redis_tls"]) if data.get("redis_tls") else None,
                api_key_file=Path(data["api_key_file"]) if data.get("api_key_file") else None,
                secret_file=Path(data["secret_file"]) if data.get("secret_file") else None,
                metrics={str(k): str(v) for k, v in data.get("metrics", {}).items()},
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{path}: not a modelyard cluster file ({exc})") from None
        for name in ("gateway", "registry"):
            if name not in info.services:
                raise ValueError(f"{path}: not a modelyard cluster file (no {name} address)")
        return info


class LocalCluster:
    """Start and stop a local cluster.

    Usage::

        cluster = LocalCluster(data_dir=Path("var"), ports="default")
        await cluster.start()
        print(cluster.gateway_address)
        await cluster.stop()

    Args:
        data_dir: Where the registry's store, Redis's files and the logs go.
        redis_url: An existing Redis; None starts an embedded one.
        ports: "default" for the well-known ports (gateway 50051, ...), "free" for port 0.
        model_servers: How many model servers to start.
        env: Extra environment for every child (e.g. MODELYARD_LOG_LEVEL).
        tls: Make a local CA and certificates in `data_dir/tls` and run every service with
            mTLS (the gateway with server-side TLS for clients unless `gateway_client_auth`).
        gateway_client_auth: Under `tls`, the gateway too requires client certificates.
        access: The services' `access.mode`: `enforce` (API keys; the registry makes an
            admin key in `data_dir/admin.key` on the first start) or `off`.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        redis_url: str | None = None,
        ports: str = "default",
        model_servers: int = 1,
        env: dict[str, str] | None = None,
        tls: bool = False,
        gateway_client_auth: bool = False,
        access: str = "enforce",
    ) -> None:
        if ports not in ("default", "free"):
            raise ValueError("ports must be 'default' or 'free'")
        if access not in ("enforce", "off"):
            raise ValueError("access must be 'enforce' or 'off'")
        self.access = access
        self.data_dir = data_dir
        self._redis_url = redis_url
        self._ports = ports
        self._model_servers = model_servers
        self._extra_env = env or {}
        self.redis: RedisServer | None = None
        self.children: list[Child] = []
        self.key_prefix = "my"
        self._wrote_cluster_file = False
        self.tls = tls
        self._gateway_client_auth = gateway_client_auth
        self.client_tls: ClientTLS | None = None
        """What clients dial the cluster with (set by `start()` under `tls`)."""
        self._redis_passwords: dict[str, str] = {}
        self.api_key: str | None = None
        """The admin API key (set by `start()` when access control is on)."""

    @property
    def tls_dir(self) -> Path:
        """The local CA and the certificates of a TLS cluster."""
        return self.data_dir / "tls"

    def _prepare_tls(self) -> None:
        ca = LocalCA.load_or_create(self.tls_dir)
        for kind in (*SERVICE_KINDS, CLIENT_KIND, "redis"):
            cert = self.tls_dir / f"{kind}.pem"
            fresh = cert.exists() and (self.tls_dir / f"{kind}-key.pem").exists()
            if fresh:
                left = certificate_expiry(cert).timestamp() - time.time()
                # A certificate of an earlier CA (its key was removed) is issued again too.
                fresh = left > RENEW_BEFORE_S and ca.issued_this(cert)
            if not fresh:
                ca.issue(kind, hosts=["127.0.0.1", "localhost", "::1"])
        client = ca.issued(CLIENT_KIND)
        self.client_tls = ClientTLS(ca.cert_file, client.cert_file, client.key_file)

    def _tls_env(self, kind: str, prefix: str) -> dict[str, str]:
        if not self.tls:
            return {}
        issued = LocalCA.issued_in(self.tls_dir, kind)
        client_auth = kind != "gateway" or self._gateway_client_auth
        return {
            f"{prefix}TLS__ENABLED": "true",
            f"{prefix}TLS__CERT_FILE": str(issued.cert_file),
            f"{prefix}TLS__KEY_FILE": str(issued.key_file),
            f"{prefix}TLS__CA_FILE": str(self.tls_dir / "ca.pem"),
            f"{prefix}TLS__CLIENT_AUTH_REQUIRED": "true" if client_auth else "false",
        }

    @property
    def cluster_file(self) -> Path:
        """Where the started cluster describes itself (`ClusterFile`)."""
        return self.data_dir / CLUSTER_FILE_NAME

    @property
    def redis_url(self) -> str:
        """The URL the supervisor uses (an embedded TLS Redis: its admin, the default user)."""
        if self._redis_url is not None:
            return self._redis_url
        assert self.redis is not None
        return self.redis.url

    @property
    def redis_tls(self) -> ClientTLS | None:
        """The files to dial an embedded TLS Redis with (as a client; services use their own
        certificate)."""
        return self.client_tls if self.tls and self._redis_url is None else None

    def redis_url_of(self, kind: str) -> str:
        """The URL a service kind dials Redis with: its own ACL user (embedded Redis)."""
        password = self._redis_passwords.get(kind)
        if password is None or self.redis is None:
            return self.redis_url
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{kind}:{password}@127.0.0.1:{self.redis.port}/0"

    @property
    def api_key_file(self) -> Path:
        """Where the registry writes the admin key on the cluster's first start."""
        return self.data_dir / "admin.key"

    @property
    def secret_file(self) -> Path:
        """The cluster secret the services prove themselves to each other with."""
        return self.data_dir / "cluster.secret"

    def _prepare_secret(self) -> None:
        if not self.secret_file.exists():
            write_private(self.secret_file, secrets.token_urlsafe(32).encode())

    def _access_env(self, kind: str, prefix: str) -> dict[str, str]:
        env = {f"{prefix}ACCESS__MODE": self.access}
        if self.access == "enforce":
            env[f"{prefix}ACCESS__SERVICE_SECRET_FILE"] = str(self.secret_file)
        if kind == "registry":
            env[f"{prefix}ADMIN_KEY_FILE"] = str(self.api_key_file)
        return env

    def _start_redis(self) -> RedisServer:
        self._redis_passwords = {kind: secrets.token_urlsafe(24) for kind in (*SERVICE_KINDS, CLIENT_KIND)}
        admin = secrets.token_urlsafe(24)
        keys = f"~{self.key_prefix}:* &{self.key_prefix}:*"
        acl = [f"user default on >{admin} ~* &* +@all"]
        # Each kind: its own password, the cluster's keys and channels, no admin commands.
        acl += [
            f"user {kind} on >{password} {keys} +@all -@admin -@dangerous"
            for kind, password in self._redis_passwords.items()
        ]
        tls = None
        if self.tls:
            issued = LocalCA.issued_in(self.tls_dir, "redis")
            tls = RedisServerTLS(issued.cert_file, issued.key_file, self.tls_dir / "ca.pem")
        return RedisServer(
            port=0,
            data_dir=self.data_dir / "redis",
            persistence=True,
            password=admin,
            tls=tls,
            acl_lines=acl,
        )

    def _redis_env(self, kind: str, prefix: str) -> dict[str, str]:
        env = {f"{prefix}REDIS__URL": self.redis_url_of(kind)}
        if self.redis_tls is not None:
            issued = LocalCA.issued_in(self.tls_dir, kind)
            env.update(
                {
                    f"{prefix}REDIS__TLS_CA_FILE": str(self.tls_dir / "ca.pem"),
                    f"{prefix}REDIS__TLS_CERT_FILE": str(issued.cert_file),
                    f"{prefix}REDIS__TLS_KEY_FILE": str(issued.key_file),
                }
            )
        return env

    def _port(self, kind: str, index: int = 0) -> int:
        return 0 if self._ports == "free" else DEFAULT_PORTS[kind] + index

    def _child(self, name: str, kind: str, module: str, prefix: str, port: int, **extra: str) -> Child:
        env = dict(os.environ)
        env.update(self._extra_env)
        service_id = new_service_id(name)
        env.update(
            {
                f"{prefix}SERVICE_ID": service_id,
                **self._redis_env(kind, prefix),
                f"{prefix}REDIS__KEY_PREFIX": self.key_prefix,
                f"{prefix}SERVER__PORT": str(port),
                f"{prefix}SERVER__METRICS_PORT": str(port + 1000 if port else 0),
                **self._tls_env(kind, prefix),
                **self._access_env(kind, prefix),
            }
        )
        env.update({f"{prefix}{k.upper()}": v for k, v in extra.items()})
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return Child(name, kind, module, env, logs / f"{name}.log", service_id)

    async def start(self, timeout_s: float = 90.0) -> None:
        """Start everything and wait until every service is registered and SERVING.

        Raises:
            RuntimeError: a child exited or was not ready in time; the message has its log.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            await asyncio.to_thread(self._prepare_tls)
        if self.access == "enforce":
            self._prepare_secret()
        if self._redis_url is None:
            self.redis = self._start_redis()
            await asyncio.to_thread(self.redis.start)
        deadline = time.monotonic() + timeout_s
        supervisor = _redis_settings(self.redis_url, self.key_prefix, self.redis_tls)
        async with CoordinationStore(supervisor) as store:
            registry = self._child(
                "registry",
                "registry",
                "registry_service",
                "MODELYARD_REGISTRY_",
                self._port("registry"),
                data_dir=str(self.data_dir / "registry"),
            )
            await self._launch([registry], store, deadline)
            if self.access == "enforce":
                self.api_key = self._read_api_key()
            batch = [
                self._child(
                    "monitor", "monitor", "monitor_service", "MODELYARD_MONITOR_", self._port("monitor")
                )
            ]
            for i in range(self._model_servers):
                batch.append(
                    self._child(
                        f"model-server-{i + 1}",
                        "model_server",
                        "model_server",
                        "MODELYARD_MODEL_SERVER_",
                        self._port("model_server", i),
                        registry_address=registry.address,
                    )
                )
            await self._launch(batch, store, deadline)
            gateway = self._child(
                "gateway", "gateway", "gateway", "MODELYARD_GATEWAY_", self._port("gateway")
            )
            await self._launch([gateway], store, deadline)
        self._write_cluster_file()

    def _read_api_key(self) -> str | None:
        try:
            return self.api_key_file.read_text().strip() or None
        except FileNotFoundError:
            log.warning(
                "%s is missing: the registry makes the admin key only on its first start; make a"
                " new one with `modelyard keys create` using another admin key",
                self.api_key_file,
            )
            return None

    def _write_cluster_file(self) -> None:
        info = ClusterFile(
            pid=os.getpid(),
            redis_url=self.redis_url_of(CLIENT_KIND),
            key_prefix=self.key_prefix,
            services={c.name: c.address for c in self.children},
            metrics={c.name: c.metrics_url for c in self.children if c.metrics_url},
            tls=self.client_tls,
            redis_tls=self.redis_tls,
            api_key_file=self.api_key_file if self.access == "enforce" else None,
            secret_file=self.secret_file if self.access == "enforce" else None,
        )
        # Owner-only: a Redis URL given with --redis-url may carry a password. Written then
        # renamed, so a reader never sees half a file.
        partial = self.cluster_file.with_suffix(".json.partial")
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(info.to_json(), out, indent=2)
            out.write("\n")
        partial.replace(self.cluster_file)
        self._wrote_cluster_file = True

    async def _launch(self, children: list[Child], store: CoordinationStore, deadline: float) -> None:
        for child in children:
            await self._spawn(child)
            self.children.append(child)
        for child in children:
            await self._wait_ready(child, store, deadline)

    async def _spawn(self, child: Child) -> None:
        if child._log is None:
            child._log = open(child.log_path, "ab")  # noqa: SIM115 - closed in stop()
        child.process = await asyncio.to_thread(
            spawn_child,
            [sys.executable, "-m", child.module],
            child._log,
            Path.cwd(),
            child.env,
        )
        child.started_at = time.monotonic()

    async def supervise(self) -> list[str]:
        """Start again, with backoff, the children that died; call it every second or so.

        A child that died is restarted after `RESTART_BACKOFF_S[0]`, doubling while it keeps
        dying within `QUICK_EXIT_S` of its start, up to `RESTART_BACKOFF_S[1]`. A restarted
        child keeps its service id (its new record replaces the old one); its address is
        written to the cluster file again once it serves.

        Returns:
            What it did, one line each, for the operator.

        Raises:
            RuntimeError: a child failed at start-up `MAX_QUICK_FAILURES` times in a row (the
                message has its log).
        """
        notes: list[str] = []
        now = time.monotonic()
        for child in self.children:
            process = child.process
            if process is None or process.poll() is None:
                continue
            if child.restart_at is None:
                quick = now - child.started_at < QUICK_EXIT_S
                child.quick_failures = child.quick_failures + 1 if quick else 1
                if child.quick_failures >= MAX_QUICK_FAILURES:
                    raise RuntimeError(
                        f"{child.name} exited {child.quick_failures} times in a row within "
                        f"{QUICK_EXIT_S:.0f}s of starting; its log ({child.log_path}):\n{child.log_tail()}"
                    )
                first, longest = RESTART_BACKOFF_S
                delay = min(first * 2 ** (child.quick_failures - 1), longest)
                child.restart_at = now + delay
                notes.append(
                    f"{child.name} exited with status {process.returncode}; starting it again in {delay:.1f}s"
                )
                log.warning(notes[-1])
            elif now >= child.restart_at:
                child.restart_at = None
                child.restarts += 1
                child.address = ""
                child.metrics_url = ""
                await self._spawn(child)
                assert child.process is not None
                notes.append(
                    f"{child.name} started again (pid {child.process.pid}, restart {child.restarts})"
                )
                log.warning(notes[-1])
        notes.extend(await self._readdress())
        return notes

    async def _readdress(self) -> list[str]:
        """Find the addresses of restarted children that serve again; rewrite the cluster file."""
        waiting = [
            c for c in self.children if not c.address and c.restart_at is None and c.process is not None
        ]
        if not waiting:
            return []
        notes = []
        async with CoordinationStore(
            _redis_settings(self.redis_url, self.key_prefix, self.redis_tls)
        ) as store:
            records = {r.id: r for r in await store.list_services()}
        for child in waiting:
            record = records.get(child.service_id)
            if record is not None and record.address and await _serving(record.address, self.client_tls):
                child.address = record.address
                child.metrics_url = self._metrics_url(record)
                notes.append(f"{child.name} serves again at {child.address}")
        if notes and self._wrote_cluster_file:
            self._write_cluster_file()
        return notes

    async def _wait_ready(self, child: Child, store: CoordinationStore, deadline: float) -> None:
        assert child.process is not None
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with status {child.process.returncode}; "
                    f"its log ({child.log_path}):\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{child.name} was not ready in time; its log ({child.log_path}):\n{child.log_tail()}"
                )
            if not child.address:
                for record in await store.list_services():
                    if record.id == child.service_id:
                        child.address = record.address
                        child.metrics_url = self._metrics_url(record)
            if child.address and await _serving(child.address, self.client_tls):
                return
            await asyncio.sleep(0.1)

    def _metrics_url(self, record: ServiceRecord) -> str:
        if not record.metrics_address:
            return ""
        scheme = record.metrics_scheme or ("https" if self.tls else "http")
        return f"{scheme}://{record.metrics_address}/metrics"

    @property
    def gateway_address(self) -> str:
        return self.address_of("gateway")

    def address_of(self, name: str) -> str:
        for child in self.children:
            if child.name == name:
                return child.address
        raise KeyError(name)

    def check_alive(self) -> list[Child]:
        """Children that have exited (and not been started again yet)."""
        return [c for c in self.children if c.process is not None and c.process.poll() is not None]

    async def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every child, newest first, so each drains; SIGKILL stragglers; stop Redis."""
        if self._wrote_cluster_file:
            self.cluster_file.unlink(missing_ok=True)
            self._wrote_cluster_file = False
        for child in reversed(self.children):
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(child.process.wait, timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", child.name, timeout_s)
                    child.process.kill()
                    await asyncio.to_thread(child.process.wait)
            if child._log is not None:
                child._log.close()
                child._log = None
        self.children.clear()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
            self.redis = None


def _redis_settings(url: str, key_prefix: str, tls: ClientTLS | None) -> RedisSettings:
    if tls is None:
        return RedisSettings(url=url, key_prefix=key_prefix)
    return RedisSettings(
        url=url,
        key_prefix=key_prefix,
        tls_ca_file=tls.ca_file,
        tls_cert_file=tls.cert_file,
        tls_key_file=tls.key_file,
    )


API_KEY_ENV = "MODELYARD_API_KEY"
"""An API key for the CLI, `modelyard top` and the load tests; wins over the cluster file's."""


def _cluster_serving(address: str, cluster_file: Path | None) -> ClusterFile | None:
    """The running local cluster whose file names `address`, or None.

    The cluster file is `cluster_file`, else `$MODELYARD_CLUSTER_FILE`, else
    `var/cluster.json` (what `modelyard up` writes with its default data dir).
    """
    path = cluster_file or Path(os.environ.get(CLUSTER_FILE_ENV) or Path("var") / CLUSTER_FILE_NAME)
    try:
        info = ClusterFile.read(path)
    except (OSError, ValueError):
        return None
    hosts = {address, address.replace("localhost:", "127.0.0.1:")}
    if not hosts & set(info.services.values()) or not info.running():
        return None
    return info


def api_key_for(address: str, cluster_file: Path | None = None) -> str | None:
    """The API key a client calls `address` with: `$MODELYARD_API_KEY`, else the admin key of
    the running local cluster whose file names that address, else None."""
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV].strip()
    info = _cluster_serving(address, cluster_file)
    if info is None or info.api_key_file is None:
        return None
    try:
        return info.api_key_file.read_text().strip() or None
    except OSError:
        return None


def tool_token_for(address: str, kind: str, cluster_file: Path | None = None) -> str | None:
    """`tool_token(kind)` of the running local cluster whose file names `address` (its
    secret readable by this user), else None: how a CLI command calls what is internal to
    the cluster (a model server's `EvaluateOptimizations`) on the operator's own cluster."""
    info = _cluster_serving(address, cluster_file)
    if info is None or info.secret_file is None:
        return None
    try:
        return tool_token(info.secret_file, kind)
    except (OSError, ValueError):
        return None


def tool_token(secret_file: Path | None, kind: str) -> str | None:
    """A service token for one of the cluster's own tools (`kind`: "demo", "load-test"), made
    from the cluster secret, so that what the tool does is recorded in the registry's audit
    log and alias history as `service:<kind>` rather than under the admin key it was given.
    None without a secret (access control off: the tool then only claims its name, see
    `modelyard.rpc.client_name`). Whoever holds the secret can make any service's token, so
    a tool's own kind adds no power, only a truthful name.

    Raises:
        OSError: the secret file cannot be read.
        ValueError: the secret is shorter than 16 bytes.
    """
    if secret_file is None:
        return None
    return ServiceTokens(secret_file.read_bytes().strip()).token(kind)


def client_tls_for(address: str, cluster_file: Path | None = None) -> ClientTLS | None:
    """How a client (the CLI, `modelyard top`) dials `address`: with the TLS material of the
    running cluster whose file names that address (`_cluster_serving`), else plaintext."""
    info = _cluster_serving(address, cluster_file)
    return info.tls if info is not None else None


async def _serving(address: str, client_tls: ClientTLS | None = None) -> bool:
    async with open_channel(address, client_tls) as channel:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            reply = await health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
