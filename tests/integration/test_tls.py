"""Encryption in transit on real servers with certificates made by the tests: the whole
Predict chain and every service pair under mTLS, refusals at the handshake and by peer kind,
a certificate rotated under load without a failed call, and expiry in /metrics."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch
from cryptography import x509
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.app import GatewayApp
from gateway.forwarder import ChannelPool
from gateway.settings import GatewaySettings
from model_server.app import ModelServerApp
from model_server.loader import RegistryArtifactSource
from model_server.settings import ModelServerSettings
from modelyard.coordination import CoordinationStore
from modelyard.rpc.server import create_server
from modelyard.settings import RedisSettings, ServerSettings, TLSSettings, load_settings
from modelyard.tensor_codec import tensor_to_proto
from modelyard.tls import ClientTLS, https_context, open_channel
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import model_server_service_pb2_grpc as ms_grpc
from modelyard.v1 import monitor_service_pb2 as mon
from modelyard.v1 import monitor_service_pb2_grpc as mon_grpc
from modelyard.v1 import registry_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1 import registry_service_pb2_grpc as reg_grpc
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
from modelyard_cli.embedded_redis import RedisServer, RedisServerTLS
from monitor_service.app import MonitorApp
from monitor_service.settings import MonitorSettings
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings
from tests.pki import Pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.make(tmp_path / "pki")


PASSWORDS = {kind: f"{kind}-secret" for kind in ("gateway", "model_server", "registry", "monitor")}


@pytest.fixture
def tls_redis(pki: Pki, tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis on TLS only, client certificates required, one ACL user per service kind."""
    redis_cert = pki.ca.issue("redis")
    acl = ["user default on >admin ~* &* +@all"] + [
        f"user {kind} on >{password} ~my:* &my:* +@all -@admin -@dangerous"
        for kind, password in PASSWORDS.items()
    ]
    with RedisServer(
        data_dir=tmp_path / "redis",
        password="admin",
        tls=RedisServerTLS(redis_cert.cert_file, redis_cert.key_file, pki.ca.cert_file),
        acl_lines=acl,
    ) as server:
        yield server


def redis_as(kind: str, server: RedisServer, pki: Pki) -> RedisSettings:
    """How a service of `kind` reaches the TLS Redis: its ACL user, its own certificate."""
    cert = pki.certs[kind]
    return RedisSettings(
        url=f"rediss://{kind}:{PASSWORDS[kind]}@127.0.0.1:{server.port}/0",
        tls_ca_file=pki.ca.cert_file,
        tls_cert_file=cert.cert_file,
        tls_key_file=cert.key_file,
    )


@dataclass
class Cluster:
    registry: RegistryApp
    model_server: ModelServerApp
    gateway: GatewayApp
    monitor: MonitorApp


@pytest.fixture
async def cluster(pki: Pki, tls_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Registry, model server, gateway and monitor, every listener and channel under mTLS,
    each on a TLS Redis as its own ACL user."""
    server = ServerSettings(port=0, metrics_port=0, drain_grace_s=1.0, heartbeat_interval_s=0.2)
    started: list[RegistryApp | ModelServerApp | GatewayApp | MonitorApp] = []
    try:
        registry = RegistryApp(
            load_settings(
                RegistrySettings,
                server=server,
                redis=redis_as("registry", tls_redis, pki),
                tls=pki.settings("registry"),
                data_dir=tmp_path / "registry",
            )
        )
        await registry.start()
        started.append(registry)
        model_server = ModelServerApp(
            load_settings(
                ModelServerSettings,
                server=server,
                redis=redis_as("model_server", tls_redis, pki),
                tls=pki.settings("model_server"),
                registry_address=registry.address,
                reconcile_interval_s=0.2,
            )
        )
        await model_server.start()
        started.append(model_server)
        gateway = GatewayApp(
            load_settings(
                GatewaySettings,
                server=server,
                redis=redis_as("gateway", tls_redis, pki),
                tls=pki.settings("gateway"),
            )
        )
        await gateway.start()
        started.append(gateway)
        monitor = MonitorApp(
            load_settings(
                MonitorSettings,
                server=server,
                redis=redis_as("monitor", tls_redis, pki),
                tls=pki.settings("monitor"),
            )
        )
        await monitor.start()
        started.append(monitor)
        yield Cluster(registry, model_server, gateway, monitor)
    finally:
        for app in reversed(started):
            await app.aclose()


async def _health(address: str, client_tls: ClientTLS | None) -> grpc.StatusCode:
    """OK when the health check answers, else the status code of the failure."""
    async with open_channel(address, client_tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_predict_chain_and_every_service_pair_under_mtls(
    cluster: Cluster, pki: Pki, tls_redis: RedisServer
) -> None:
    client = pki.client()
    module, artifact = build_demo_model(seed=7)
    # client → registry (upload), model server → registry (download), gateway → model server.
    await register_model(cluster.registry.address, "tls", artifact, demo_signature(), tls=client)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    [answer] = await predict_until_served(cluster.gateway.address, "tls", [x], module, tls=client)
    torch.testing.assert_close(answer.output, answer.expected)

    # client → monitor, and monitor → every service's /metrics over HTTPS with its certificate.
    await cluster.monitor.collector.scrape()
    # One process here, so one view; every service's endpoint was scraped into it.
    scraped = set().union(*(p.service_ids for p in cluster.monitor.collector.processes.values()))
    assert len(scraped) == 4
    async with open_channel(cluster.monitor.address, client) as channel:
        status = await mon_grpc.MonitorServiceStub(channel).GetClusterStatus(mon.GetClusterStatusRequest())
    assert {s.state for s in status.services} == {mon.SERVICE_STATE_UP}
    assert len(status.services) == 4

    # Every service on Redis over TLS, as its own ACL user, and nothing refused by the ACLs.
    admin = redis.Redis(
        host="127.0.0.1",
        port=tls_redis.port,
        password="admin",
        ssl=True,
        ssl_ca_certs=str(pki.ca.cert_file),
        ssl_certfile=str(pki.certs["client"].cert_file),
        ssl_keyfile=str(pki.certs["client"].key_file),
    )
    try:
        users = {c["user"] for c in admin.client_list()}
        assert set(PASSWORDS) <= users
        assert admin.acl_log() == []
    finally:
        admin.close()

    # monitor → registry (its own channel, for baselines and traffic splits).
    listed = await cluster.monitor.registry.stub().ListModels(reg.ListModelsRequest(), timeout=5)
    assert [m.name for m in listed.models] == ["tls"]

    # /metrics is HTTPS with client certificates: plain HTTP and no certificate are refused.
    metrics = f"127.0.0.1:{cluster.gateway.server.metrics.port}"  # type: ignore[union-attr]
    with pytest.raises(OSError):
        await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read())
    with pytest.raises(OSError):
        context = https_context(pki.client(None))
        await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"https://{metrics}/metrics", timeout=5, context=context).read()
        )
    context = https_context(pki.client())
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"https://{metrics}/metrics", timeout=5, context=context).read()
    )
    assert b"modelyard_tls_certificate_expiry_timestamp_seconds" in body


async def test_the_registry_proves_a_deployment_change_on_a_model_server_under_mtls(
    cluster: Cluster, pki: Pki
) -> None:
    client = pki.client()
    _, artifact = build_demo_model(seed=7)
    await register_model(cluster.registry.address, "tls-proof", artifact, demo_signature(), tls=client)
    request = reg.SetDeploymentRequest(
        model="tls-proof",
        deployment=registry_pb2.Deployment(precision="bf16", max_abs_error=1e6),
        update_mask=field_mask_pb2.FieldMask(paths=["precision", "max_abs_error"]),
    )
    async with open_channel(cluster.registry.address, client) as channel:
        stub = reg_grpc.RegistryServiceStub(channel)
        # registry → model server (EvaluateOptimizations, which CALLERS opens to the registry's
        # certificate for that method only: Infer stays refused to it, below).
        await stub.SetDeployment(request, timeout=60)
        got = await stub.GetModelVersion(reg.GetModelVersionRequest(model="tls-proof", version=1), timeout=5)
    (report,) = got.model_version.optimization_reports
    assert (report.precision, report.reference_device) == ("bf16", "cpu")
    assert report.server_id == cluster.model_server.service_id and report.sample == "baseline"


async def test_clients_without_a_good_certificate_are_refused_at_the_handshake(
    cluster: Cluster, pki: Pki
) -> None:
    for app in (cluster.registry, cluster.model_server, cluster.gateway, cluster.monitor):
        address = app.address
        assert await _health(address, pki.client()) is grpc.StatusCode.OK
        # No client certificate, one from another CA, plaintext: the handshake fails.
        assert await _health(address, pki.client(None)) is grpc.StatusCode.UNAVAILABLE
        assert await _health(address, pki.client("foreign-gateway")) is grpc.StatusCode.UNAVAILABLE
        assert await _health(address, None) is grpc.StatusCode.UNAVAILABLE
    # A client that does not trust the cluster's CA refuses the server.
    assert await _health(cluster.gateway.address, pki.client(ca=pki.foreign)) is grpc.StatusCode.UNAVAILABLE


async def test_a_model_server_takes_inference_only_from_the_gateway_and_monitor(
    cluster: Cluster, pki: Pki
) -> None:
    request = ms.InferRequest(model="none", version=1, inputs=[tensor_to_proto("input", torch.zeros(1, 64))])
    for kind, expected in [
        ("client", grpc.StatusCode.PERMISSION_DENIED),
        ("registry", grpc.StatusCode.PERMISSION_DENIED),
        ("model_server", grpc.StatusCode.PERMISSION_DENIED),
        ("gateway", grpc.StatusCode.NOT_FOUND),  # let through: the model is not held
        ("monitor", grpc.StatusCode.NOT_FOUND),
    ]:
        async with open_channel(cluster.model_server.address, pki.client(kind)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ms_grpc.ModelServerServiceStub(channel).Infer(request, timeout=5)
        assert err.value.code() is expected, (kind, err.value.details())
        if expected is grpc.StatusCode.PERMISSION_DENIED:
            assert kind in (err.value.details() or "")
        else:
            assert "not held" in (err.value.details() or "")
    # Everyone the CA vouches for may ask a model server's health.
    assert await _health(cluster.model_server.address, pki.client("client")) is grpc.StatusCode.OK


async def test_the_gateway_serves_clients_with_server_side_tls_only(
    pki: Pki, redis_settings: RedisSettings
) -> None:
    gateway = GatewayApp(
        load_settings(
            GatewaySettings,
            server=ServerSettings(port=0, metrics_port=0),
            redis=redis_settings,
            tls=pki.settings("gateway", client_auth_required=False),
        )
    )
    await gateway.start()
    try:
        async with open_channel(gateway.address, pki.client(None)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await inf_grpc.InferenceServiceStub(channel).Predict(inf.PredictRequest(model="x"), timeout=5)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND  # through TLS, to the router
        assert await _health(gateway.address, None) is grpc.StatusCode.UNAVAILABLE
    finally:
        await gateway.aclose()


def _served_serial(port: int, pki: Pki) -> int:
    """The serial number of the certificate a server presents to a new connection."""
    context = https_context(pki.client())
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_certificate_rotated_under_load_fails_no_call(pki: Pki) -> None:
    tls = pki.settings("registry")
    srv = create_server(
        ServerSettings(port=0, metrics_port=0),
        tls,
        service_names=[],
        register=lambda server: None,
        kind="registry",
    )
    await srv.start()
    await srv.set_serving(True)
    try:
        before = _served_serial(srv.port, pki)
        failures: list[BaseException] = []
        calls = 0
        stop = asyncio.Event()

        async def caller(fresh_channels: bool) -> None:
            nonlocal calls
            channel = open_channel(srv.address, pki.client())
            try:
                while not stop.is_set():
                    if fresh_channels:  # a new connection, so a new handshake, per call
                        await channel.close()
                        channel = open_channel(srv.address, pki.client())
                    try:
                        await health_pb2_grpc.HealthStub(channel).Check(
                            health_pb2.HealthCheckRequest(), timeout=5
                        )
                        calls += 1
                    except grpc.aio.AioRpcError as exc:
                        failures.append(exc)
            finally:
                await channel.close()

        tasks = [asyncio.create_task(caller(fresh)) for fresh in (False, False, True, True)]
        await asyncio.sleep(0.5)
        pki.ca.issue("registry")  # same files, new key and certificate
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
        assert not failures, failures[:3]
        assert calls > 20
        after = _served_serial(srv.port, pki)
        assert after != before
        # /metrics (HTTPS) serves the rotated certificate from the next handshake on too.
        assert _served_serial(srv.metrics.port, pki) == after  # type: ignore[union-attr]
        assert after == x509.load_pem_x509_certificate(tls.cert_file.read_bytes()).serial_number  # type: ignore[union-attr]
    finally:
        await srv.drain(0)


async def test_expiry_is_in_metrics_with_a_warning_before_it_comes(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    soon = pki.ca.issue("monitor", name="short-lived", days=2)
    tls = TLSSettings(
        enabled=True,
        cert_file=soon.cert_file,
        key_file=soon.key_file,
        ca_file=pki.ca.cert_file,
        client_auth_required=True,
    )
    with caplog.at_level(logging.WARNING, logger="modelyard.tls"):
        srv = create_server(
            ServerSettings(port=0, metrics_port=0),
            tls,
            service_names=[],
            register=lambda s: None,
            kind="monitor",
        )
    assert any("expires in" in r.getMessage() and "short-lived" in r.getMessage() for r in caplog.records)
    await srv.start()
    try:
        context = https_context(pki.client())
        url = f"https://127.0.0.1:{srv.metrics.port}/metrics"  # type: ignore[union-attr]
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5, context=context).read())
        expiry = x509.load_pem_x509_certificate(soon.cert_file.read_bytes()).not_valid_after_utc.timestamp()
        line = next(
            line
            for line in body.decode().splitlines()
            if line.startswith("modelyard_tls_certificate_expiry_timestamp_seconds") and "short-lived" in line
        )
        assert float(line.rsplit(" ", 1)[1]) == pytest.approx(expiry)
    finally:
        await srv.drain(0)


async def test_plaintext_stays_the_default(redis_settings: RedisSettings) -> None:
    gateway = GatewayApp(
        load_settings(GatewaySettings, server=ServerSettings(port=0, metrics_port=0), redis=redis_settings)
    )
    await gateway.start()
    try:
        assert not gateway.settings.tls.enabled
        assert await _health(gateway.address, None) is grpc.StatusCode.OK
        url = f"http://127.0.0.1:{gateway.server.metrics.port}/metrics"  # type: ignore[union-attr]
        assert await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).status) == 200
    finally:
        await gateway.aclose()


async def test_the_registry_lists_over_mtls_for_the_cli_kind(cluster: Cluster, pki: Pki) -> None:
    async with open_channel(cluster.registry.address, pki.client()) as channel:
        listed = await reg_grpc.RegistryServiceStub(channel).ListModels(reg.ListModelsRequest(), timeout=5)
    assert list(listed.models) == []


def test_redis_over_tls_refuses_plaintext_foreign_certificates_and_other_keys(
    tls_redis: RedisServer, pki: Pki
) -> None:
    def client(kind: str | None, cert: str = "gateway", ssl: bool = True) -> redis.Redis:
        options: dict[str, object] = {}
        if ssl:
            options = {
                "ssl": True,
                "ssl_ca_certs": str(pki.ca.cert_file),
                "ssl_certfile": str(pki.certs[cert].cert_file),
                "ssl_keyfile": str(pki.certs[cert].key_file),
            }
        auth = {"username": kind, "password": PASSWORDS[kind]} if kind else {}
        return redis.Redis(host="127.0.0.1", port=tls_redis.port, socket_timeout=5, **auth, **options)  # type: ignore[arg-type]

    gateway = client("gateway")
    try:
        assert gateway.set("my:probe", "1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.set("other:probe", "1")  # outside the cluster's key prefix
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.flushall()
    finally:
        gateway.close()
    for refused in (client("gateway", ssl=False), client("gateway", cert="foreign-gateway")):
        with pytest.raises(redis.exceptions.ConnectionError):
            refused.ping()
        refused.close()
    wrong = client(None)
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()  # the default user needs the admin password
    wrong.close()


async def test_rotating_the_gateway_and_model_server_certificates_under_predict_load_fails_no_call(
    cluster: Cluster, pki: Pki
) -> None:
    client = pki.client()
    module, artifact = build_demo_model(seed=2)
    await register_model(cluster.registry.address, "rot", artifact, demo_signature(), tls=client)
    await predict_until_served(cluster.gateway.address, "rot", [torch.zeros(1, 64)], module, tls=client)
    request = inf.PredictRequest(model="rot", inputs=[tensor_to_proto("input", torch.ones(2, 64))])
    failures: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()

    async def caller(fresh_channels: bool) -> None:
        nonlocal calls
        channel = open_channel(cluster.gateway.address, client)
        try:
            while not stop.is_set():
                if fresh_channels:  # a handshake per call, against whatever the gateway holds
                    await channel.close()
                    channel = open_channel(cluster.gateway.address, client)
                try:
                    await inf_grpc.InferenceServiceStub(channel).Predict(request, timeout=10)
                    calls += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
        finally:
            await channel.close()

    tasks = [asyncio.create_task(caller(fresh)) for fresh in (False, False, True)]
    await asyncio.sleep(0.5)
    before = {kind: pki.certs[kind].cert_file.read_bytes() for kind in ("gateway", "model_server")}
    for kind in before:
        pki.ca.issue(kind)
    # Calls keep the connections they have; the fresh channels shake hands with the new
    # certificate.
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    assert not failures, failures[:3]
    assert calls > 10
    for kind, old in before.items():
        assert pki.certs[kind].cert_file.read_bytes() != old
    for kind, port in (("gateway", cluster.gateway.port), ("model_server", cluster.model_server.port)):
        current = x509.load_pem_x509_certificate(pki.certs[kind].cert_file.read_bytes())
        assert _served_serial(port, pki) == current.serial_number, kind


async def test_the_gateway_pool_opens_its_channels_again_after_its_client_certificate_rotated(
    pki: Pki,
) -> None:
    async def whoami(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        return str(x509.load_pem_x509_certificate(pem).serial_number).encode()

    def register(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(whoami)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Who", {"Am": handler})])

    srv = create_server(
        ServerSettings(port=0, metrics_port=0), pki.settings("registry"), service_names=[], register=register
    )
    await srv.start()
    pool = ChannelPool(
        max_message_bytes=1 << 20,
        tls=ClientTLS.from_settings(pki.settings("gateway")),
        tls_check_interval_s=0.05,
    )
    try:

        async def serial_seen() -> int:
            return int(await pool.call(srv.address, "/test.Who/Am", b"", 5, "rid"))

        def serial_on_disk() -> int:
            pem = pki.certs["gateway"].cert_file.read_bytes()
            return x509.load_pem_x509_certificate(pem).serial_number

        assert await serial_seen() == serial_on_disk()
        old = serial_on_disk()
        pki.ca.issue("gateway")
        await asyncio.sleep(0.1)
        assert await serial_seen() == serial_on_disk() != old
    finally:
        await pool.aclose()
        await srv.drain(0)


async def test_the_model_servers_registry_client_dials_again_after_its_certificate_rotated(
    cluster: Cluster, pki: Pki
) -> None:
    _module, artifact = build_demo_model(seed=4)
    version = await register_model(
        cluster.registry.address, "fetch", artifact, demo_signature(), tls=pki.client()
    )
    source = RegistryArtifactSource(
        cluster.registry.address,
        max_message_bytes=1 << 26,
        tls=ClientTLS.from_settings(pki.settings("model_server")),
        tls_check_interval_s=0.05,
    )
    try:
        assert (await source.fetch("fetch", version)).data == artifact
        pki.ca.issue("model_server")
        await asyncio.sleep(0.1)
        assert (await source.fetch("fetch", version)).data == artifact  # on a new channel
    finally:
        await source.aclose()


async def test_a_sentinel_managed_redis_over_tls_follows_a_failover(pki: Pki, tmp_path: Path) -> None:
    redis_cert = pki.ca.issue("redis")
    tls = RedisServerTLS(redis_cert.cert_file, redis_cert.key_file, pki.ca.cert_file)
    replication = ["--tls-replication", "yes"]
    servers: list[RedisServer] = []
    try:
        master = RedisServer(data_dir=tmp_path / "master", tls=tls, extra_args=replication)
        master.start()
        servers.append(master)
        replica = RedisServer(
            data_dir=tmp_path / "replica",
            tls=tls,
            extra_args=[*replication, "--replicaof", "127.0.0.1", str(master.port)],
        )
        replica.start()
        servers.append(replica)
        sentinel = RedisServer(
            data_dir=tmp_path / "sentinel",
            tls=tls,
            extra_args=replication,
            sentinel_config=(
                f"sentinel monitor ha 127.0.0.1 {master.port} 1\n"
                "sentinel down-after-milliseconds ha 500\n"
                "sentinel failover-timeout ha 3000\n"
            ),
        )
        sentinel.start()
        servers.append(sentinel)
        cert = pki.certs["gateway"]
        settings = RedisSettings(
            url=f"rediss+sentinel://127.0.0.1:{sentinel.port}/ha",
            tls_ca_file=pki.ca.cert_file,
            tls_cert_file=cert.cert_file,
            tls_key_file=cert.key_file,
        )
        async with CoordinationStore(settings) as store:
            await store.apply_aliases("m", {"production": 1}, epoch=1)
            # Wait until the replica has it, then lose the master.
            deadline = time.monotonic() + 10
            while True:
                probe = redis.Redis(
                    port=replica.port,
                    ssl=True,
                    ssl_ca_certs=str(pki.ca.cert_file),
                    ssl_certfile=str(cert.cert_file),
                    ssl_keyfile=str(cert.key_file),
                )
                try:
                    if probe.exists("my:model:{m}:aliases"):
                        break
                finally:
                    probe.close()
                assert time.monotonic() < deadline, "the replica never caught up"
                await asyncio.sleep(0.1)
            master.kill()
            deadline = time.monotonic() + 30
            while True:
                try:
                    await store.apply_aliases("m", {"production": 2}, epoch=2)
                    break
                except Exception:
                    assert time.monotonic() < deadline, "no failover over TLS in 30 s"
                    await asyncio.sleep(0.5)
            aliases = await store.all_aliases()
            assert aliases["m"][0] == {"production": 2}
    finally:
        for server in reversed(servers):
            server.stop()
