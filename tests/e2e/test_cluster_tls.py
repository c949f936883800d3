"""`modelyard up --tls` as child processes: a local CA and per-service certificates, every
service on mTLS, and the clients a user has (the demo client, the CLI, `modelyard top`,
`tritonclient` with `ssl=True`, the load tests) working from what the cluster file records,
and Redis on TLS with an ACL user per service kind."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import torch
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from modelyard.tls import ClientTLS, open_channel
from modelyard_cli import registry as cli_registry
from modelyard_cli import top as cli_top
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
from modelyard_cli.local_cluster import CLUSTER_FILE_ENV, ClusterFile, LocalCluster, client_tls_for
from tests.integration.test_gateway_oip import triton_python

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

__all__ = ["triton_python"]  # the fixture, shared with the OIP tests

# Run by the tritonclient venv's python: one inference over TLS with only the CA, as a Triton
# user would call a gateway with server-side TLS.
TRITON_TLS_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

address, ca_file, key = sys.argv[1], sys.argv[2], sys.argv[3]
client = grpcclient.InferenceServerClient(url=address, ssl=True, root_certificates=ca_file)
headers = {"authorization": f"Bearer {key}"}
try:
    x = np.zeros((2, 64), dtype=np.float32)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("tls-demo", [inp], headers=headers)
    live = client.is_server_live(headers=headers)
    print(json.dumps({"live": live, "output": result.as_numpy("output").tolist()}))
finally:
    client.close()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One `modelyard up --tls` cluster for the module (started with asyncio.run: LocalCluster
    keeps no loop-bound state between start and stop)."""
    local = LocalCluster(
        data_dir=tmp_path_factory.mktemp("tls-cluster"),
        ports="free",
        tls=True,
        env={"MODELYARD_LOG_LEVEL": "INFO"},
    )
    try:
        asyncio.run(local.start())
        yield local
    finally:
        asyncio.run(local.stop())


async def _health(address: str, client_tls: ClientTLS | None) -> grpc.StatusCode:
    async with open_channel(address, client_tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _cli(*args: str, cluster_file: Path) -> tuple[int, str]:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    app.command(name="top")(cli_top.top)
    result = CliRunner().invoke(app, list(args), env={CLUSTER_FILE_ENV: str(cluster_file)})
    return result.exit_code, result.output


async def test_up_with_tls_serves_the_demo_to_every_client(
    cluster: LocalCluster, triton_python: Path
) -> None:
    info = ClusterFile.read(cluster.cluster_file)
    assert info.tls is not None and info.tls == cluster.client_tls
    assert info.tls.ca_file is not None and info.tls.ca_file.parent == cluster.tls_dir
    tls = info.tls

    module, artifact = build_demo_model(seed=11)
    await register_model(
        info.registry, "tls-demo", artifact, demo_signature(), tls=tls, token=cluster.api_key
    )
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    [answer] = await predict_until_served(
        info.gateway, "tls-demo", [x], module, tls=tls, token=cluster.api_key
    )
    torch.testing.assert_close(answer.output, answer.expected)

    # Plaintext is refused everywhere; the gateway takes clients with only the CA.
    for name, address in info.services.items():
        assert await _health(address, None) is grpc.StatusCode.UNAVAILABLE, name
        assert await _health(address, tls) is grpc.StatusCode.OK, name
    assert await _health(info.gateway, ClientTLS(ca_file=tls.ca_file)) is grpc.StatusCode.OK
    assert await _health(info.registry, ClientTLS(ca_file=tls.ca_file)) is grpc.StatusCode.UNAVAILABLE

    # The CLI and `modelyard top` find the CA and client certificate through the cluster file.
    assert client_tls_for(info.registry, cluster.cluster_file) == tls
    code, output = await asyncio.to_thread(
        _cli, "models", "list", "--registry", info.registry, cluster_file=cluster.cluster_file
    )
    assert code == 0, output
    assert "tls-demo" in output
    code, output = await asyncio.to_thread(
        _cli, "top", "--once", "--monitor", info.services["monitor"], cluster_file=cluster.cluster_file
    )
    assert code == 0, output
    assert "tls-demo" in output or "gateway" in output

    # Redis: TLS only, and each service as its own ACL user, none of whose commands was refused.
    assert info.redis_url.startswith("rediss://client:") and info.redis_tls is not None
    settings = info.redis_settings()
    admin = redis.Redis.from_url(
        cluster.redis_url,
        ssl_ca_certs=str(settings.tls_ca_file),
        ssl_certfile=str(settings.tls_cert_file),
        ssl_keyfile=str(settings.tls_key_file),
    )
    try:
        users = {c["user"] for c in admin.client_list()}
        assert {"gateway", "model_server", "registry", "monitor"} <= users, users
        assert admin.acl_log() == []
    finally:
        admin.close()
    plain = redis.Redis.from_url(cluster.redis_url.replace("rediss://", "redis://"), socket_timeout=5)
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    plain.close()

    # tritonclient with ssl=True and the CA, on the gateway's OIP endpoint.
    done = await asyncio.to_thread(
        subprocess.run,
        [str(triton_python), "-c", TRITON_TLS_SCRIPT, info.gateway, str(tls.ca_file), str(cluster.api_key)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["live"]
    with torch.inference_mode():
        expected = module(torch.zeros(2, 64))
    torch.testing.assert_close(torch.tensor(result["output"]), expected)


def test_the_load_tests_run_over_mtls_from_the_cluster_file(cluster: LocalCluster, tmp_path: Path) -> None:
    _module, artifact = build_demo_model()
    asyncio.run(
        register_model(
            cluster.address_of("registry"),
            "demo",
            artifact,
            demo_signature(),
            tls=cluster.client_tls,
            token=cluster.api_key,
        )
    )
    results = tmp_path / "steady"
    done = subprocess.run(
        [sys.executable, "-m", "load_tests", "run", "steady", "--cluster-file", str(cluster.cluster_file)]
        + ["--users", "2", "--duration", "3s", "--results-dir", str(results)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((results / "summary.json").read_text())
    assert summary["stats"]["requests"] > 0 and summary["stats"]["failures"] == 0


def test_server_lost_joins_and_kills_a_model_server_of_its_own_over_mtls(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    # The joined model server needs the cluster's model_server certificate (gRPC and /metrics
    # over mTLS) and the Redis TLS and ACL user from the cluster file.
    results = tmp_path / "lost"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "load_tests",
            "run",
            "server_lost",
            "--cluster-file",
            str(cluster.cluster_file),
        ]
        + ["--users", "2", "--duration", "8s", "--results-dir", str(results)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((results / "summary.json").read_text())
    events = " ".join(e["event"] for e in summary["timeline"])
    assert "the gateway routes to model-server-load-test-" in events, events
    assert "killed model-server-load-test-" in events, events
