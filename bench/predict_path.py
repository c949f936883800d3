"""Cost of each hop on the Predict path, measured in one run on this machine.

Starts a local cluster (free ports; access control on, as `modelyard up` runs it: the gateway
is called with the admin key, the model server with the service token the gateway sends;
`--access off` leaves the check out, `ab.py --base-env ..._ACCESS__MODE=off` measures its
cost), registers the demo MLP, then measures closed-loop throughput and latency at 1 and 32
concurrent callers for:
  - in-process torch (the reference),
  - a direct Infer call to the model server,
  - Predict through the gateway.
Writes JSON (and prints a table) with ratios against the references of the same run.

    .venv/bin/python bench/predict_path.py [--seconds 5] [--access enforce|off]
                                           [--out bench/results/local/predict_path.json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import torch

from modelyard.access.client import bearer_metadata
from modelyard.access.keys import ServiceTokens
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
from modelyard_cli.local_cluster import LocalCluster


async def closed_loop(call, payload: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            await call(payload, timeout=10)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def torch_reference(module: torch.jit.ScriptModule, seconds: float) -> dict[str, float]:
    x = torch.randn(1, 64)
    count, stop_at = 0, time.perf_counter() + seconds
    with torch.inference_mode():
        while time.perf_counter() < stop_at:
            module(x)
            count += 1
    return {"concurrency": 1, "requests_per_s": count / seconds}


async def main(seconds: float, out: Path, access: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(data_dir=Path(tmp), ports="free", access=access)
        await cluster.start()
        try:
            key = cluster.api_key
            # What the gateway itself calls the model server with.
            service = (
                ServiceTokens(cluster.secret_file.read_bytes().strip()).token("gateway")
                if access == "enforce"
                else None
            )
            module, artifact = build_demo_model()
            version = await register_model(
                cluster.address_of("registry"), "bench", artifact, demo_signature(), token=key
            )
            await predict_until_served(cluster.gateway_address, "bench", [torch.zeros(1, 64)], token=key)
            tensor = tensor_to_proto("input", torch.randn(1, 64))
            predict = inf.PredictRequest(model="bench", inputs=[tensor]).SerializeToString()
            infer = ms.InferRequest(model="bench", version=version, inputs=[tensor]).SerializeToString()
            results: dict[str, object] = {
                "access": access,
                "torch_in_process": torch_reference(module, seconds),
            }
            async with (
                grpc.aio.insecure_channel(cluster.gateway_address) as gw,
                grpc.aio.insecure_channel(cluster.address_of("model-server-1")) as direct,
            ):
                # The credentials as explicit metadata: a client interceptor would add its own
                # cost to every measured call.
                gw_call = functools.partial(
                    gw.unary_unary("/modelyard.v1.InferenceService/Predict"), metadata=bearer_metadata(key)
                )
                ms_call = functools.partial(
                    direct.unary_unary("/modelyard.v1.ModelServerService/Infer"),
                    metadata=bearer_metadata(service),
                )
                for c in (1, 32):
                    await closed_loop(ms_call, infer, c, 1.0)  # warm-up
                    results[f"direct_c{c}"] = await closed_loop(ms_call, infer, c, seconds)
                    await closed_loop(gw_call, predict, c, 1.0)
                    results[f"gateway_c{c}"] = await closed_loop(gw_call, predict, c, seconds)
        finally:
            await cluster.stop()
    for c in (1, 32):
        d, g = results[f"direct_c{c}"], results[f"gateway_c{c}"]
        assert isinstance(d, dict) and isinstance(g, dict)
        results[f"ratio_c{c}"] = {
            "gateway_over_direct_throughput": g["requests_per_s"] / d["requests_per_s"],
            "gateway_added_p50_ms": g["p50_ms"] - d["p50_ms"],
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--access",
        choices=["enforce", "off"],
        default="enforce",
        help="the cluster's access control (off: the hops without the access check)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/local/predict_path.json"))
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.out, args.access))
