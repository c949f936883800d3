"""`modelyard up --free-ports` (a real `LocalCluster`: Redis and four service processes) says
where each service's /metrics is: in cluster.json, matching what the monitor reports, and
each URL answers with Prometheus text."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.tls import open_channel
from modelyard.v1 import monitor_service_pb2 as mon
from modelyard.v1 import monitor_service_pb2_grpc as mon_grpc
from modelyard_cli.local_cluster import ClusterFile, LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    local = LocalCluster(data_dir=tmp_path / "cluster", ports="free", env={"MODELYARD_LOG_LEVEL": "WARNING"})
    try:
        await local.start()
        yield local
    finally:
        await local.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


async def test_cluster_file_and_status_name_every_metrics_url(cluster: LocalCluster) -> None:
    info = ClusterFile.read(cluster.cluster_file)
    assert set(info.metrics) == set(info.services) == {"registry", "monitor", "model-server-1", "gateway"}
    for name, url in info.metrics.items():
        grpc_port = int(info.services[name].rsplit(":", 1)[1])
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        assert not url.endswith(f":{grpc_port + 1000}/metrics")  # free ports: no fixed offset
        body = await asyncio.to_thread(_get, url)
        assert "# TYPE process_start_time_seconds gauge" in body

    monitor = info.services["monitor"]
    async with open_channel(monitor, None, token=cluster.api_key) as channel:
        status = await mon_grpc.MonitorServiceStub(channel).GetClusterStatus(
            mon.GetClusterStatusRequest(), timeout=10
        )
    reported = {s.address: f"{s.metrics_scheme}://{s.metrics_address}/metrics" for s in status.services}
    assert {info.services[name]: url for name, url in info.metrics.items()} == reported
