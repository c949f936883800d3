"""Shared integration fixtures: real model servers and gateways (port 0) on the session's real
Redis, serving real TorchScript modules from an in-memory artifact source.

Also `registry`: a real registry on port 0 with its store in the test's tmp_path.

Usage::

    async def test_x(cluster_source, launch_model_server, launch_gateway, store):
        cluster_source.add("mlp", 1, torch.jit.script(module), signature)
        await store.apply_aliases("mlp", {"production": 1}, 1)
        await launch_model_server()
        gateway = await launch_gateway(coalesce_max_in_flight=1)
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from model_server.app import ModelServerApp
from model_server.loader import Artifact
from model_server.settings import ModelServerSettings
from modelyard.errors import VersionNotFound
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

__all__ = ["ClusterSource", "LaunchGateway", "LaunchModelServer", "converge"]


class ClusterSource:
    """Artifacts of TorchScript modules, by model and version, built when added."""

    def __init__(self) -> None:
        self.modules: dict[tuple[str, int], torch.jit.ScriptModule] = {}
        self._artifacts: dict[tuple[str, int], Artifact] = {}

    def add(
        self, model: str, version: int, module: torch.jit.ScriptModule, signature: tensor_pb2.Signature
    ) -> None:
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        data = buffer.getvalue()
        self.modules[(model, version)] = module
        self._artifacts[(model, version)] = Artifact(
            model=model,
            version=version,
            format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
            sha256=hashlib.sha256(data).hexdigest(),
            signature=signature,
            data=data,
        )

    def run(self, model: str, version: int, *inputs: torch.Tensor) -> torch.Tensor:
        """In-process torch: the reference answer."""
        with torch.inference_mode():
            result: torch.Tensor = self.modules[(model, version)](*inputs)
            return result

    async def fetch(self, model: str, version: int) -> Artifact:
        artifact = self._artifacts.get((model, version))
        if artifact is None:
            raise VersionNotFound(f"no {model} v{version}")
        return artifact


async def converge(condition: Callable[[], bool], *, timeout_s: float = 30.0) -> None:
    """Wait until the cluster converges (heartbeats and events travel through Redis)."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("the cluster did not converge")
        await asyncio.sleep(0.02)


@pytest.fixture
async def registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[RegistryApp]:
    """A real registry on port 0 with its store under the test's tmp_path (a module that needs
    other settings, such as no retention or trusted signers, defines its own)."""
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
        )
    )
    await app.start()
    yield app
    await app.aclose()


@pytest.fixture
async def launch(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Starts model servers on a real registry (`await launch(registry, **overrides)`), fast
    heartbeats and reconciles, one compile cache directory; closes them all at the end."""
    apps: list[ModelServerApp] = []

    async def start(registry: RegistryApp, **overrides: Any) -> ModelServerApp:
        app = ModelServerApp(
            load_settings(
                ModelServerSettings,
                server=ServerSettings(port=0, metrics_port=0, drain_grace_s=1.0, heartbeat_interval_s=0.2),
                redis=redis_settings,
                registry_address=registry.address,
                reconcile_interval_s=0.2,
                max_batch_size=8,
                compile_cache_dir=tmp_path / "compiled",
                **overrides,
            )
        )
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.aclose()


@pytest.fixture
def cluster_source() -> ClusterSource:
    return ClusterSource()


LaunchModelServer = Callable[..., Awaitable[ModelServerApp]]
LaunchGateway = Callable[..., Awaitable[GatewayApp]]


@pytest.fixture
async def launch_model_server(
    redis_settings: RedisSettings, cluster_source: ClusterSource
) -> AsyncIterator[LaunchModelServer]:
    """Starts model servers serving `cluster_source` (settings overrides as keywords)."""
    apps: list[ModelServerApp] = []

    async def launch(**overrides: Any) -> ModelServerApp:
        values: dict[str, Any] = {
            "server": ServerSettings(port=0, metrics_port=0, drain_grace_s=1.0, heartbeat_interval_s=0.2),
            "redis": redis_settings,
            "reconcile_interval_s": 0.2,
            **overrides,
        }
        app = ModelServerApp(load_settings(ModelServerSettings, **values), artifact_source=cluster_source)
        apps.append(app)
        await app.start()
        return app

    yield launch
    for app in reversed(apps):
        await app.aclose()


@pytest.fixture
async def launch_gateway(redis_settings: RedisSettings) -> AsyncIterator[LaunchGateway]:
    """Starts gateways (settings overrides as keywords)."""
    apps: list[GatewayApp] = []

    async def launch(**overrides: Any) -> GatewayApp:
        values: dict[str, Any] = {
            "server": ServerSettings(port=0, metrics_port=0, drain_grace_s=1.0),
            "redis": redis_settings,
            "resync_interval_s": 0.2,
            **overrides,
        }
        app = GatewayApp(load_settings(GatewaySettings, **values))
        apps.append(app)
        await app.start()
        return app

    yield launch
    for app in reversed(apps):
        await app.aclose()
