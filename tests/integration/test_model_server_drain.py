"""SIGTERM on a real `python -m model_server` process: every request it had accepted is
answered, new ones are refused with UNAVAILABLE, and the process exits cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from modelyard.coordination import CoordinationStore
from modelyard.settings import RedisSettings
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1.model_server_service_pb2_grpc import ModelServerServiceStub
from tests.integration import test_model_server as base
from tests.integration.test_model_server import infer_request, point, publish, torchscript_bytes

pytestmark = pytest.mark.integration

registry = base.registry
channels = base.channels
registry_stub = base.registry_stub

ACCEPTED = 24


class Slow(torch.nn.Module):
    """The test model's shape ([N, 16] -> [N, 4]) with a few ms of work per item, so that a
    queue of requests is still being worked through when SIGTERM lands."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(16, 128)
        self.mix = torch.nn.Parameter(torch.randn(128, 128) / 12)
        self.out = torch.nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for _ in range(400):
            h = torch.tanh(h @ self.mix)
        return self.out(h)


@pytest.fixture
async def server_process(
    redis_settings: RedisSettings, registry: Any, tmp_path: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "MODELYARD_MODEL_SERVER_REDIS__URL": redis_settings.url,
        "MODELYARD_MODEL_SERVER_REGISTRY_ADDRESS": registry.address,
        "MODELYARD_MODEL_SERVER_SERVER__PORT": "0",
        "MODELYARD_MODEL_SERVER_SERVER__DRAIN_GRACE_S": "30",
        "MODELYARD_MODEL_SERVER_SERVER__HEARTBEAT_INTERVAL_S": "0.2",
        "MODELYARD_MODEL_SERVER_RECONCILE_INTERVAL_S": "0.2",
        "MODELYARD_MODEL_SERVER_DRAIN_SETTLE_S": "0.1",
        # One item per batch: the accepted requests queue up behind each other.
        "MODELYARD_MODEL_SERVER_MAX_BATCH_SIZE": "1",
    }
    log = (tmp_path / "model_server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "model_server"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        log.close()


async def address_of_model_server(store: CoordinationStore, process: subprocess.Popen[bytes]) -> str:
    for _ in range(3000):
        assert process.poll() is None, "the model server exited while starting"
        for record in await store.list_services():
            if record.kind == "model_server":
                return record.address
        await asyncio.sleep(0.01)
    raise AssertionError("the model server never joined the cluster")


async def test_sigterm_answers_every_accepted_request(
    store: CoordinationStore,
    registry_stub: Any,
    channels: Any,
    server_process: subprocess.Popen[bytes],
) -> None:
    version = await publish(registry_stub, torchscript_bytes(Slow().eval()))
    await point(registry_stub, version)
    stub = ModelServerServiceStub(channels(await address_of_model_server(store, server_process)))
    for _ in range(3000):
        status = await stub.GetServerStatus(ms.GetServerStatusRequest())
        if any(v.state == ms.VERSION_STATE_READY for v in status.loaded_versions):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the version never became ready")

    calls = [
        asyncio.ensure_future(stub.Infer(infer_request(torch.randn(1, 16), version), timeout=60))
        for _ in range(ACCEPTED)
    ]
    # Gate: every call is either answered or waiting in the server's batcher.
    while True:
        status = await stub.GetServerStatus(ms.GetServerStatusRequest())
        outstanding = sum(v.outstanding_requests for v in status.loaded_versions)
        answered = sum(c.done() for c in calls)
        if outstanding + answered == ACCEPTED:
            break
        await asyncio.sleep(0.005)
    assert outstanding > 0, "the model was too fast for the test to mean anything"

    server_process.send_signal(signal.SIGTERM)
    responses = await asyncio.gather(*calls, return_exceptions=True)
    failed = [r for r in responses if isinstance(r, BaseException)]
    assert failed == [], f"{len(failed)} accepted requests were lost: {failed[:3]}"
    assert all(len(r.outputs) == 1 for r in responses)

    # New work is refused while it drains (or the listener is already gone), never hung.
    late = await asyncio.gather(
        stub.Infer(infer_request(torch.randn(1, 16), version), timeout=10), return_exceptions=True
    )
    if isinstance(late[0], grpc.aio.AioRpcError):
        assert late[0].code() == grpc.StatusCode.UNAVAILABLE

    returncode = await asyncio.to_thread(server_process.wait, 30)
    assert returncode == 0
    assert not [r for r in await store.list_services() if r.kind == "model_server"]
