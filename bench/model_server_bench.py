"""The model server alone vs in-process torch, on the reference models, in one run.

One command::

    .venv/bin/python bench/model_server_bench.py                      # full run (~4 min)
    .venv/bin/python bench/model_server_bench.py --duration 1 --warmup 0.5 --concurrency 1 8

What it does:

1. Builds `mlp.pt` and `cnn.pt` with ../shared/bench/make_models.py (the peers' models).
2. Measures in-process torch (1 intra-op thread, inference_mode): items/s at batch 1 and at
   batch 64 (the "limit" a batching server can approach on this box).
3. Starts an embedded Redis, a registry process, and one model server process per
   configuration (batching on: max_batch_size 64, 2 ms window; off: max_batch_size 1),
   registers both models and waits until they are ready.
4. Drives the model server's Open Inference Protocol `ModelInfer` with a grpc.aio
   closed-loop load generator shaped like ../shared/bench/loadgen.py (the one the peers were
   measured with): one pre-serialized batch-1 request with raw_input_contents, responses not
   parsed, CONCURRENCY coroutines on one channel, only calls that start after the warm-up
   and end before the deadline counted. The server process tree's CPU is sampled too.
5. Writes JSON (`--out`) and prints a Markdown table, with the fraction of the in-process
   torch limit each point reaches.

The client shares the machine with the server, as in ../shared/bench/PEERS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from modelyard.oip import grpc_service_pb2 as oip
from modelyard.oip.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from modelyard.v1 import tensor_pb2
from modelyard_cli.demo import register_model
from modelyard_cli.embedded_redis import RedisServer

ROOT = Path(__file__).resolve().parent.parent
MAKE_MODELS = ROOT.parent / "shared" / "bench" / "make_models.py"
SHAPES = {"mlp": [64], "cnn": [3, 32, 32]}
CLK = os.sysconf("SC_CLK_TCK")
CONFIGS = {
    "batching": {"MAX_BATCH_SIZE": "64", "MAX_QUEUE_DELAY_MS": "2"},
    "no_batching": {"MAX_BATCH_SIZE": "1", "MAX_QUEUE_DELAY_MS": "0"},
}


def signature(model: str) -> tensor_pb2.Signature:
    fp32 = tensor_pb2.DATA_TYPE_FP32
    return tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="INPUT__0", data_type=fp32, shape=[-1, *SHAPES[model]])],
        outputs=[tensor_pb2.TensorSpec(name="OUTPUT__0", data_type=fp32, shape=[-1, 10])],
    )


def tree_cpu_s(pid: int) -> float:
    """utime+stime (s) of pid and its live descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(st[1]), []).append(int(d))
            except OSError:
                pass
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            total += (int(st[11]) + int(st[12])) / CLK
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


# -- in-process torch ------------------------------------------------------------------------


def torch_items_per_s(path: Path, model: str, batch: int, seconds: float) -> float:
    module = torch.jit.load(str(path)).eval()
    x = torch.randn(batch, *SHAPES[model])
    with torch.inference_mode():
        for _ in range(5):
            module(x)
        runs, stop_at = 0, time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            module(x)
            runs += 1
    return runs * batch / seconds


# -- load generator --------------------------------------------------------------------------


def build_request(model: str) -> bytes:
    x = np.random.default_rng(0).standard_normal([1, *SHAPES[model]], dtype=np.float32)
    request = oip.ModelInferRequest(model_name=model, id="lg")
    tensor = request.inputs.add(name="INPUT__0", datatype="FP32")
    tensor.shape.extend([1, *SHAPES[model]])
    request.outputs.add(name="OUTPUT__0")
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


async def closed_loop(
    address: str, model: str, concurrency: int, warmup_s: float, duration_s: float, server_pid: int
) -> dict[str, Any]:
    payload = build_request(model)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        first = oip.ModelInferResponse.FromString(await call(payload, timeout=10))
        assert list(first.outputs[0].shape) == [1, 10] and first.raw_output_contents, first
        t_start = time.perf_counter_ns()
        rec_start = t_start + int(warmup_s * 1e9)
        deadline = rec_start + int(duration_s * 1e9)
        latencies: list[int] = []
        errors: dict[str, int] = {}
        marks: dict[str, float] = {}

        async def worker() -> None:
            while True:
                t0 = time.perf_counter_ns()
                if t0 >= deadline:
                    return
                try:
                    await call(payload, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    await asyncio.sleep(0.01)
                    continue
                t1 = time.perf_counter_ns()
                if t0 >= rec_start and t1 <= deadline:
                    latencies.append(t1 - t0)

        async def sampler() -> None:
            await asyncio.sleep(warmup_s)
            marks["c0"], marks["s0"] = time.process_time(), tree_cpu_s(server_pid)
            await asyncio.sleep(duration_s)
            marks["c1"], marks["s1"] = time.process_time(), tree_cpu_s(server_pid)

        await asyncio.wait_for(
            asyncio.gather(sampler(), *(worker() for _ in range(concurrency))), warmup_s + duration_s + 15
        )
    lat = np.array(latencies, dtype=np.int64) / 1e6
    return {
        "model": model,
        "concurrency": concurrency,
        "requests": int(lat.size),
        "throughput": round(lat.size / duration_s, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        "errors": errors,
        "client_cpu_pct": round(100 * (marks["c1"] - marks["c0"]) / duration_s, 1),
        "server_cpu_pct": round(100 * (marks["s1"] - marks["s0"]) / duration_s, 1),
    }


# -- processes -------------------------------------------------------------------------------


@contextmanager
def child(module: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def address_of(redis_url: str, kind: str, process: subprocess.Popen[bytes], log: Path) -> str:
    from modelyard.coordination import CoordinationStore
    from modelyard.settings import RedisSettings

    async with CoordinationStore(RedisSettings(url=redis_url)) as store:
        for _ in range(12000):
            if process.poll() is not None:
                raise RuntimeError(f"{kind} exited:\n{log.read_text()[-3000:]}")
            for record in await store.list_services():
                if record.kind == kind:
                    return record.address
            await asyncio.sleep(0.01)
    raise RuntimeError(f"{kind} never registered")


async def wait_models_ready(address: str, models: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        for _ in range(12000):
            ready = [(await stub.ModelReady(oip.ModelReadyRequest(name=m))).ready for m in models]
            if all(ready):
                return
            await asyncio.sleep(0.01)
    raise RuntimeError("models never became ready")


# -- main ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "torch_in_process": {},
        "server": {},
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        subprocess.run(
            [sys.executable, str(MAKE_MODELS), str(tmp / "models")], check=True, stdout=subprocess.DEVNULL
        )
        paths = {m: tmp / "models" / f"{m}.pt" for m in args.models}
        for model, path in paths.items():
            results["torch_in_process"][model] = {
                f"batch{b}_items_per_s": round(torch_items_per_s(path, model, b, args.torch_seconds), 1)
                for b in (1, 64)
            }
        with RedisServer(port=0, data_dir=tmp / "redis") as redis:
            registry_env = {
                "MODELYARD_REGISTRY_REDIS__URL": redis.url,
                "MODELYARD_REGISTRY_SERVER__PORT": "0",
                "MODELYARD_REGISTRY_SERVER__METRICS_PORT": "0",
                "MODELYARD_REGISTRY_DATA_DIR": str(tmp / "registry"),
            }
            with child("registry_service", registry_env, tmp / "registry.log") as registry:
                registry_address = await address_of(redis.url, "registry", registry, tmp / "registry.log")
                for model, path in paths.items():
                    data = path.read_bytes()
                    await register_model(registry_address, model, data, signature(model))
                    results.setdefault("artifacts", {})[model] = hashlib.sha256(data).hexdigest()[:12]
                for config in args.configs:
                    env = {
                        "MODELYARD_MODEL_SERVER_REDIS__URL": redis.url,
                        "MODELYARD_MODEL_SERVER_REGISTRY_ADDRESS": registry_address,
                        "MODELYARD_MODEL_SERVER_SERVER__PORT": "0",
                        "MODELYARD_MODEL_SERVER_SERVER__METRICS_PORT": "0",
                        "MODELYARD_MODEL_SERVER_SERVER__ACCESS_LOG_ENABLED": "false",
                        **{f"MODELYARD_MODEL_SERVER_{k}": v for k, v in CONFIGS[config].items()},
                    }
                    log = tmp / f"model_server_{config}.log"
                    with child("model_server", env, log) as server:
                        address = await address_of(redis.url, "model_server", server, log)
                        await wait_models_ready(address, list(paths))
                        points = []
                        for model in paths:
                            for concurrency in args.concurrency:
                                point = await closed_loop(
                                    address, model, concurrency, args.warmup, args.duration, server.pid
                                )
                                limit = results["torch_in_process"][model]["batch64_items_per_s"]
                                point["fraction_of_torch_limit"] = round(point["throughput"] / limit, 4)
                                print(json.dumps({"config": config, **point}), flush=True)
                                points.append(point)
                        results["server"][config] = points
                    # Wait for its record to go, so the next config's server is the one found.
                    from modelyard.coordination import CoordinationStore
                    from modelyard.settings import RedisSettings

                    async with CoordinationStore(RedisSettings(url=redis.url)) as store:
                        while any(r.kind == "model_server" for r in await store.list_services()):
                            await asyncio.sleep(0.05)
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| config | model | conc | infer/s | p50 ms | p99 ms | server CPU % | client CPU % "
        "| of torch b64 limit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, points in results["server"].items():
        for p in points:
            lines.append(
                f"| {config} | {p['model']} | {p['concurrency']} | {p['throughput']:.0f} | {p['p50_ms']} | "
                f"{p['p99_ms']} | {p['server_cpu_pct']} | {p['client_cpu_pct']} | "
                f"{100 * p['fraction_of_torch_limit']:.1f}% |"
            )
    lines.append("")
    lines.append("| in-process torch (1 thread) | batch 1 items/s | batch 64 items/s |")
    lines.append("|---|---:|---:|")
    for model, r in results["torch_in_process"].items():
        lines.append(f"| {model} | {r['batch1_items_per_s']:.0f} | {r['batch64_items_per_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=sorted(SHAPES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--torch-seconds", type=float, default=1.5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/local/model_server_bench.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
