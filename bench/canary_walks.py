"""Canary judgement on a real cluster: false rollbacks of identical canaries, and how fast a
slower or a failing canary is rolled back.

One in-process cluster (embedded Redis, registry, one model server, gateway, monitor, all on
free ports) under steady closed-loop Predict load on the default alias, which the traffic
split shares between production and the canary. The monitor walks each canary through the
steps (`--steps`, `--step-after` s each; its window is the step length, so each step is
judged on its own traffic) with the product's default margins (`CanarySettings()`: 1 point of
error rate, p90 x 1.5 + 5 ms, confidence 0.99, 100 requests). Then:

- `--identical` walks of a canary with production's architecture (new weights): each must
  reach promotion; a rollback is a false rollback;
- `--faulty` walks of a canary `--slowdown` times slower (its forward does that much more
  work), and of one failing 5 % of the calls (it raises on marked inputs, which production
  answers): each must be rolled back before its first step ends; the time from the walk's
  start (the canary alias moved) to the rollback is reported.

    .venv/bin/python bench/canary_walks.py [--identical 20] [--faulty 3] [--callers 8]
                                          [--out bench/results/local/canary_walks.json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from model_server.app import ModelServerApp
from model_server.settings import ModelServerSettings
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli.embedded_redis import RedisServer
from monitor_service.app import MonitorApp
from monitor_service.canary import CanaryAction, CanaryDecision, CanarySettings
from monitor_service.collector import histogram_quantile
from monitor_service.settings import MonitorSettings
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

MODEL = "walks"
OFF = {"mode": "off"}
"""Access control off: every service listens on 127.0.0.1 only, and the bench is about the
monitor's judgement, not the access check."""
FEATURES = 16
MARK = 99.0
"""Inputs whose first value is this make the failing canary raise (production answers them)."""
SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, FEATURES])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
)


class Work(torch.nn.Module):
    """A model with a fixed amount of work per forward (`rounds` 256-wide layers on a 64-row
    block), and optionally failing on marked inputs."""

    def __init__(self, rounds: int, fail: bool = False) -> None:
        super().__init__()
        self.rounds = rounds
        self.fail = fail
        self.square = torch.nn.Linear(256, 256)
        self.head = torch.nn.Linear(FEATURES, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail and bool((x[:, 0] == 99.0).any()):
            raise RuntimeError("marked input")
        h = torch.ones(64, 256)
        for _ in range(self.rounds):
            h = torch.tanh(self.square(h))
        return self.head(x) + h[0, :4].sum() * 0.0


def torchscript(module: torch.nn.Module, seed: int) -> bytes:
    torch.manual_seed(seed)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.05)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module.eval()), buffer)
    return buffer.getvalue()


async def upload(stub: Any, module: torch.nn.Module, seed: int) -> int:
    data = torchscript(module, seed)

    async def requests() -> AsyncIterator[reg.UploadModelVersionRequest]:
        yield reg.UploadModelVersionRequest(
            metadata=reg.UploadModelVersionMetadata(
                model=MODEL,
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=hashlib.sha256(data).hexdigest(),
                signature=SIGNATURE,
            )
        )
        yield reg.UploadModelVersionRequest(chunk=data)

    return int((await stub.UploadModelVersion(requests())).model_version.version)


class Load:
    """Closed-loop callers on the default alias; `mark` of the calls carry the failing mark."""

    def __init__(self, gateway: Any, callers: int, mark: float) -> None:
        self.gateway = gateway
        self.mark = mark
        self.calls = 0
        self.failed: dict[str, int] = {}
        self._tasks = [asyncio.create_task(self._caller(i)) for i in range(callers)]

    async def _caller(self, seed: int) -> None:
        rng = random.Random(seed)
        while True:
            row = [rng.gauss(0, 1) for _ in range(FEATURES)]
            if rng.random() < self.mark:
                row[0] = MARK
            request = inf.PredictRequest(model=MODEL, inputs=[tensor_to_proto("input", torch.tensor([row]))])
            try:
                await self.gateway.Predict(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                self.failed[err.code().name] = self.failed.get(err.code().name, 0) + 1
            self.calls += 1

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def aliases(stub: Any) -> dict[str, int]:
    model = (await stub.GetModel(reg.GetModelRequest(name=MODEL))).model
    return {a.name: a.version for a in model.aliases}


async def walk(
    stub: Any,
    monitor: MonitorApp,
    module: torch.nn.Module,
    seed: int,
    settings: CanarySettings,
    timeout_s: float,
) -> dict[str, Any]:
    """Upload a canary, move the canary alias to it (warm before the flip), and wait for the
    walk's end; what happened, and when."""
    version = await upload(stub, module, seed)
    seen = len(monitor.canary.decisions)
    await stub.PromoteVersion(
        reg.PromoteVersionRequest(model=MODEL, alias=settings.canary_alias, version=version)
    )
    started = time.time()
    deadline = time.monotonic() + timeout_s
    while True:
        await monitor.wait_rounds(1)
        new: list[CanaryDecision] = list(monitor.canary.decisions)[: len(monitor.canary.decisions) - seen]
        final = [d for d in new if d.canary.version == version and d.action in _FINAL]
        if final:
            decision = final[0]
            break
        if time.monotonic() > deadline:
            return {
                "version": version,
                "outcome": "timeout",
                "decisions": [d.action.value for d in reversed(new)],
            }
    start = next(
        (d for d in reversed(new) if d.action is CanaryAction.START and d.canary.version == version), None
    )
    return {
        "version": version,
        "outcome": decision.action.value,
        "seconds": round(decision.time - (start.time if start else started), 2),
        "at_fraction": max((d.traffic_fraction for d in new if d.canary.version == version), default=0.0),
        "reason": decision.reason,
        "canary_requests": decision.canary.request_count,
    }


_FINAL = (CanaryAction.PROMOTE, CanaryAction.ROLLBACK, CanaryAction.END)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.ERROR)
    steps = [float(s) for s in args.steps.split(",")]
    settings = CanarySettings(promote_steps=steps, step_after_s=args.step_after)
    with tempfile.TemporaryDirectory() as tmp, RedisServer() as redis_server:
        redis = RedisSettings(url=redis_server.url)
        registry = RegistryApp(
            load_settings(
                RegistrySettings,
                server=ServerSettings(port=0),
                redis=redis,
                access=OFF,
                data_dir=Path(tmp) / "registry",
            )
        )
        await registry.start()
        model_server = ModelServerApp(
            load_settings(
                ModelServerSettings,
                server=ServerSettings(port=0, heartbeat_interval_s=0.5),
                redis=redis,
                access=OFF,
                registry_address=registry.address,
                reconcile_interval_s=0.5,
                max_batch_size=16,
            )
        )
        await model_server.start()
        gateway_app = GatewayApp(
            load_settings(
                GatewaySettings, server=ServerSettings(port=0, metrics_port=0), redis=redis, access=OFF
            )
        )
        await gateway_app.start()
        monitor = MonitorApp(
            load_settings(
                MonitorSettings,
                server=ServerSettings(port=0, metrics_port=0),
                redis=redis,
                access=OFF,
                scrape_interval_s=args.scrape_interval,
                window_s=args.step_after,
                canary=settings,
            )
        )
        channel = grpc.aio.insecure_channel(registry.address)
        gateway_channel = grpc.aio.insecure_channel(gateway_app.address)
        stub = RegistryServiceStub(channel)
        gateway = inf_grpc.InferenceServiceStub(gateway_channel)
        load: Load | None = None
        try:
            await stub.CreateModel(reg.CreateModelRequest(name=MODEL))
            production = await upload(stub, Work(args.rounds), seed=0)
            await stub.PromoteVersion(
                reg.PromoteVersionRequest(model=MODEL, alias="production", version=production)
            )
            await stub.SetAlias(reg.SetAliasRequest(model=MODEL, alias="canary", version=production))
            await monitor.start()
            load = Load(gateway, args.callers, mark=0.05)
            await asyncio.sleep(args.step_after)  # a full window of production traffic
            results: dict[str, list[dict[str, Any]]] = {"identical": [], "slower": [], "failing": []}
            seed = 1
            timeout = args.step_after * (len(steps) + 2) + 30
            for _ in range(args.identical):
                results["identical"].append(
                    await walk(stub, monitor, Work(args.rounds), seed, settings, timeout)
                )
                seed += 1
                print("identical", results["identical"][-1], flush=True)
            slow = Work(round(args.rounds * args.slowdown))
            for kind, module in (("slower", slow), ("failing", Work(args.rounds, fail=True))):
                for _ in range(args.faulty):
                    results[kind].append(await walk(stub, monitor, module, seed, settings, timeout))
                    seed += 1
                    print(kind, results[kind][-1], flush=True)
            calls, failed = load.calls, dict(load.failed)
        finally:
            if load is not None:
                await load.aclose()
            await channel.close()
            await gateway_channel.close()
            await monitor.aclose()
            await gateway_app.aclose()
            await model_server.aclose()
            await registry.aclose()

    final_production = next(
        (key for key, figures in monitor.stats.items() if "production" in figures.aliases), None
    )
    stats = monitor.stats.get(final_production) if final_production else None
    identical = results["identical"]
    faulty = results["slower"] + results["failing"]
    return {
        "bench": "canary_walks",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "settings": {
            **settings.model_dump(),
            "window_s": args.step_after,
            "scrape_interval_s": args.scrape_interval,
            "callers": args.callers,
            "slowdown": args.slowdown,
        },
        "calls": calls,
        "calls_failed_by_code": failed,
        "production_latency_ms_last_window": {
            "p50": round(histogram_quantile(0.5, stats.latency_histogram) * 1000, 2),
            "p90": round(histogram_quantile(0.9, stats.latency_histogram) * 1000, 2),
            "requests_per_s": round(stats.requests_per_second, 1),
        }
        if stats
        else None,
        "identical_walks": len(identical),
        "false_rollbacks": sum(r["outcome"] == "rollback" for r in identical),
        "identical_promoted": sum(r["outcome"] == "promote" for r in identical),
        "faulty_rolled_back_in_first_step": sum(
            r["outcome"] == "rollback" and r["seconds"] < args.step_after and r["at_fraction"] <= steps[0]
            for r in faulty
        ),
        "faulty_walks": len(faulty),
        "detection_s": {
            kind: {
                "each": [r.get("seconds") for r in results[kind]],
                "median": statistics.median(
                    [r["seconds"] for r in results[kind] if "seconds" in r] or [float("nan")]
                ),
            }
            for kind in ("slower", "failing")
        },
        "walks": results,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identical", type=int, default=20)
    parser.add_argument("--faulty", type=int, default=3, help="Walks of each faulty kind.")
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=40, help="Layers per forward of production.")
    parser.add_argument("--slowdown", type=float, default=2.0)
    parser.add_argument("--steps", default="0.25,0.5,1.0")
    parser.add_argument("--step-after", type=float, default=10.0)
    parser.add_argument("--scrape-interval", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/local/canary_walks.json"))
    arguments = parser.parse_args()
    result = asyncio.run(main(arguments))
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "walks"}, indent=2))
