"""Redis high availability: the whole Predict path on a Sentinel-managed Redis (master,
replica, three Sentinels, all real redis-server processes) keeps answering while the master
is killed, and alias changes work again once the replica has been promoted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
import torch

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from model_server.app import ModelServerApp
from model_server.settings import ModelServerSettings
from modelyard.coordination import parse_sentinel_url
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard_cli.demo import build_demo_model, demo_signature, register_model
from modelyard_cli.embedded_redis import RedisServer
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SERVICE = "modelyard"


class RedisHA:
    """A master, one replica and three Sentinels (quorum 2)."""

    def __init__(self, root: Path) -> None:
        self.master = RedisServer(data_dir=root / "master", persistence=True)
        self.master.start()
        self.replica = RedisServer(
            data_dir=root / "replica",
            persistence=True,
            extra_args=["--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.replica.start()
        config = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 4000\n"
        )
        self.sentinels = [
            RedisServer(data_dir=root / f"sentinel-{i}", sentinel_config=config) for i in range(3)
        ]
        for sentinel in self.sentinels:
            sentinel.start()

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self) -> int:
        client = redis.Redis(port=self.sentinels[0].port, decode_responses=True)
        try:
            _host, port = client.sentinel_get_master_addr_by_name(SERVICE)
            return int(port)
        finally:
            client.close()

    def wait_replica_caught_up(self) -> None:
        """Block until the replica holds every write made so far (replication is ordered, so
        a fresh write acknowledged by it covers everything before)."""
        client = redis.Redis(port=self.master.port)
        try:
            client.set("failover-test:barrier", "1")
            assert client.wait(1, 5000) >= 1, "the replica did not acknowledge in 5 s"
        finally:
            client.close()

    def stop(self) -> None:
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()


@pytest.fixture
def redis_ha(tmp_path: Path) -> Iterator[RedisHA]:
    ha = RedisHA(tmp_path)
    try:
        # Sentinels must know each other and the replica before a failover can happen.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            client = redis.Redis(port=ha.sentinels[0].port, decode_responses=True)
            info = client.sentinel_master(SERVICE)
            client.close()
            if int(info["num-other-sentinels"]) >= 2 and int(info["num-slaves"]) >= 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the Sentinels never saw each other and the replica")
        yield ha
    finally:
        ha.stop()


def test_sentinel_urls_parse() -> None:
    assert parse_sentinel_url("redis+sentinel://:s3cret@h1:26379,h2:26380/mymaster/2") == (
        [("h1", 26379), ("h2", 26380)],
        "mymaster",
        2,
        "s3cret",
    )
    with pytest.raises(ValueError, match="names no Sentinel service"):
        parse_sentinel_url("redis+sentinel://h1:26379")


@pytest.fixture
async def cluster(redis_ha: RedisHA, tmp_path: Path) -> AsyncIterator[tuple[RegistryApp, GatewayApp]]:
    redis_settings = RedisSettings(url=redis_ha.url, socket_timeout_s=1.0)
    fast = {"heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 10.0, "drain_grace_s": 1.0}
    registry = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, **fast),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
            redis_resync_interval_s=0.5,
        )
    )
    await registry.start()
    model_server = ModelServerApp(
        load_settings(
            ModelServerSettings,
            server=ServerSettings(port=0, **fast),
            redis=redis_settings,
            registry_address=registry.address,
            reconcile_interval_s=0.3,
        )
    )
    await model_server.start()
    gateway = GatewayApp(
        load_settings(
            GatewaySettings,
            server=ServerSettings(port=0, **fast),
            redis=redis_settings,
            resync_interval_s=0.3,
        )
    )
    await gateway.start()
    try:
        yield registry, gateway
    finally:
        await gateway.aclose()
        await model_server.aclose()
        await registry.aclose()


async def test_predict_keeps_working_through_a_master_failover(
    redis_ha: RedisHA, cluster: tuple[RegistryApp, GatewayApp]
) -> None:
    registry, gateway = cluster
    module, artifact = build_demo_model()
    v1 = await register_model(registry.address, "ha", artifact, demo_signature())
    x = torch.randn(2, 64)
    request = inf.PredictRequest(model="ha", inputs=[tensor_to_proto("input", x)])

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:  # wait until the gateway has seen the alias and v1 is loaded
            try:
                await stub.Predict(request, timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

        failures: list[str] = []
        served = 0
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal served
            while not stop.is_set():
                try:
                    reply = await stub.Predict(request, timeout=5)
                    assert reply.version == v1
                    served += 1
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.01)

        workers = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.5)
        old_master = redis_ha.master_port()
        # Asynchronous replication can lose the last writes in a failover (the registry
        # would repair them within its resync interval); this test is about serving through
        # the switch, so the replica is caught up first.
        await asyncio.to_thread(redis_ha.wait_replica_caught_up)
        redis_ha.master.kill()
        deadline = time.monotonic() + 30
        while redis_ha.master_port() == old_master:
            assert time.monotonic() < deadline, "Sentinel never promoted the replica"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # keep the load on a little after the switch
        stop.set()
        await asyncio.gather(*workers)
        assert served > 0
        assert failures == []

        # Alias changes work again against the new master.
        _, artifact2 = build_demo_model(seed=1)
        deadline = time.monotonic() + 30
        while True:
            try:
                v2 = await register_model(registry.address, "ha", artifact2, demo_signature())
                break
            except grpc.aio.AioRpcError as exc:
                assert time.monotonic() < deadline, exc
                await asyncio.sleep(0.5)
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = await stub.Predict(request, timeout=5)
                if reply.version == v2:
                    break
            except grpc.aio.AioRpcError as exc:  # v2 still loading
                assert exc.code() is grpc.StatusCode.UNAVAILABLE, exc
            assert time.monotonic() < deadline, "the new alias target never served"
            await asyncio.sleep(0.2)
