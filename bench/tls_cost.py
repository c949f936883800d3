"""Throughput cost of TLS on Predict, through the gateway and direct to the model server,
against plaintext in the same run.

Starts two local clusters side by side (free ports, embedded Redis, the demo MLP): one
plaintext, one `modelyard up --tls` (mTLS between services, server-side TLS from the client
to the gateway, TLS Redis). Then drives both in interleaved rounds, swapping which goes first
each round, so the machine's noise falls on both alike. Per point (path x concurrency):
median throughput, p50/p99 and CPU per call (gateway, model server, the bench's client) over
the rounds, and the ratios TLS / plaintext. Also the time to open a new connection and make
one call (the handshake's cost), plaintext and TLS.

Both clusters run with access control as `modelyard up` does (`--access off` leaves it out):
the bench calls the gateway with the admin key and the model server with the service token
the gateway sends, the same on both sides, so the ratios are TLS's alone.

    .venv/bin/python bench/tls_cost.py [--seconds 3] [--rounds 3] [--concurrency 1,32]
                                       [--access enforce|off]
                                       [--out bench/results/local/tls_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from modelyard.access.client import bearer_metadata
from modelyard.access.keys import ServiceTokens
from modelyard.tensor_codec import tensor_to_proto
from modelyard.tls import ClientTLS, LocalCA, open_channel
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard_cli.demo import build_demo_model, demo_signature, predict_until_served, register_model
from modelyard_cli.local_cluster import LocalCluster

PREDICT = "/modelyard.v1.InferenceService/Predict"
INFER = "/modelyard.v1.ModelServerService/Infer"
HEALTH = "/grpc.health.v1.Health/Check"


async def closed_loop(
    call: Callable[..., Awaitable[Any]], payload: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
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
        "requests_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000,
    }


async def connect_ms(address: str, tls: ClientTLS | None, samples: int = 30) -> float:
    """Median time to open a new channel and complete one health check on it."""
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        async with open_channel(address, tls) as channel:
            check: Any = channel.unary_unary(HEALTH)  # bytes in, bytes out (no serializers)
            await check(b"", timeout=10)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * _TICK_S


class Side:
    """One cluster and the channels the bench drives it through."""

    def __init__(self, name: str, cluster: LocalCluster) -> None:
        self.name = name
        self.cluster = cluster
        self.gateway_tls: ClientTLS | None = None
        self.direct_tls: ClientTLS | None = None
        self.version = 0
        self.gateway_metadata: tuple[tuple[str, str], ...] = ()
        """The admin key, on each call to the gateway (access control on)."""
        self.direct_metadata: tuple[tuple[str, str], ...] = ()
        """The service token the gateway sends, on each call straight to the model server."""

    def service_cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of the gateway and the model server."""
        out = {}
        for child in self.cluster.children:
            if child.kind in ("gateway", "model_server") and child.process is not None:
                out[child.kind] = cpu_s(child.process.pid)
        return out

    async def prepare(self, artifact: bytes, module: torch.jit.ScriptModule) -> None:
        """After the cluster started: its TLS files exist, and the demo model serves."""
        if self.cluster.client_tls is not None:
            # The client dials the gateway with the CA only (server-side TLS), and the model
            # server as a gateway would (it takes Infer only from the gateway and monitor).
            ca = self.cluster.client_tls.ca_file
            gateway = LocalCA.issued_in(self.cluster.tls_dir, "gateway")
            self.gateway_tls = ClientTLS(ca_file=ca)
            self.direct_tls = ClientTLS(ca, gateway.cert_file, gateway.key_file)
        key = self.cluster.api_key
        if self.cluster.access == "enforce":
            secret = self.cluster.secret_file.read_bytes().strip()
            self.gateway_metadata = bearer_metadata(key)
            self.direct_metadata = bearer_metadata(ServiceTokens(secret).token("gateway"))
        self.version = await register_model(
            self.cluster.address_of("registry"),
            "bench",
            artifact,
            demo_signature(),
            tls=self.cluster.client_tls,
            token=key,
        )
        await predict_until_served(
            self.cluster.gateway_address,
            "bench",
            [torch.zeros(1, 64)],
            module,
            tls=self.cluster.client_tls,
            token=key,
        )


async def main(seconds: float, rounds: int, concurrencies: list[int], out: Path, access: str) -> None:
    module, artifact = build_demo_model()
    tensor = tensor_to_proto("input", torch.randn(1, 64))
    predict = inf.PredictRequest(model="bench", inputs=[tensor]).SerializeToString()
    env = {"MODELYARD_LOG_LEVEL": "WARNING"}
    with tempfile.TemporaryDirectory() as tmp:
        plain = LocalCluster(data_dir=Path(tmp) / "plain", ports="free", env=env, access=access)
        tls = LocalCluster(data_dir=Path(tmp) / "tls", ports="free", env=env, tls=True, access=access)
        sides = [Side("plaintext", plain), Side("tls", tls)]
        try:
            for side in sides:
                await side.cluster.start()
                await side.prepare(artifact, module)
            samples: dict[str, dict[str, list[dict[str, float]]]] = {s.name: {} for s in sides}
            channels = []
            calls: dict[tuple[str, str], tuple[Callable[..., Awaitable[Any]], bytes]] = {}
            for side in sides:
                gw = open_channel(side.cluster.gateway_address, side.gateway_tls)
                direct = open_channel(side.cluster.address_of("model-server-1"), side.direct_tls)
                channels += [gw, direct]
                infer = ms.InferRequest(
                    model="bench", version=side.version, inputs=[tensor]
                ).SerializeToString()
                # The credentials as explicit metadata: a client interceptor would add its own
                # cost to every measured call.
                calls[(side.name, "gateway")] = (
                    functools.partial(gw.unary_unary(PREDICT), metadata=side.gateway_metadata),
                    predict,
                )
                calls[(side.name, "direct")] = (
                    functools.partial(direct.unary_unary(INFER), metadata=side.direct_metadata),
                    infer,
                )
            for (name, path), (call, payload) in calls.items():
                try:
                    await closed_loop(call, payload, 8, 1.0)  # warm-up: connections, caches
                except Exception as exc:
                    raise RuntimeError(f"{name} {path}: {exc}") from exc
            for r in range(rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for path in ("direct", "gateway"):
                    for c in concurrencies:
                        for side in order:
                            call, payload = calls[(side.name, path)]
                            before, client_before = side.service_cpu_s(), time.process_time()
                            result = await closed_loop(call, payload, c, seconds)
                            after, client_after = side.service_cpu_s(), time.process_time()
                            n = result["requests_per_s"] * seconds
                            # CPU per call holds up against a noisy machine far better than
                            # throughput: another process's load slows calls, not their cost.
                            for kind in after:
                                result[f"{kind}_cpu_ms_per_call"] = (after[kind] - before[kind]) * 1000 / n
                            result["client_cpu_ms_per_call"] = (client_after - client_before) * 1000 / n
                            samples[side.name].setdefault(f"{path}_c{c}", []).append(result)
                print(f"round {r + 1}/{rounds} done", flush=True)
            connect = {
                "plaintext_gateway_ms": await connect_ms(plain.gateway_address, None),
                "tls_gateway_ms": await connect_ms(tls.gateway_address, sides[1].gateway_tls),
                "plaintext_direct_ms": await connect_ms(plain.address_of("model-server-1"), None),
                "tls_direct_mtls_ms": await connect_ms(tls.address_of("model-server-1"), sides[1].direct_tls),
            }
            for channel in channels:
                await channel.close()
        finally:
            for side in sides:
                await side.cluster.stop()

    points: dict[str, Any] = {}
    for key in samples["plaintext"]:
        point: dict[str, Any] = {}
        for name in ("plaintext", "tls"):
            runs = samples[name][key]
            point[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            point[name]["rounds_requests_per_s"] = [round(r["requests_per_s"], 1) for r in runs]
        point["tls_over_plaintext_throughput"] = (
            point["tls"]["requests_per_s"] / point["plaintext"]["requests_per_s"]
        )
        # Paired per round (both sides ran back to back): steadier than the ratio of medians.
        by_round = [
            t["requests_per_s"] / p["requests_per_s"]
            for t, p in zip(samples["tls"][key], samples["plaintext"][key], strict=True)
        ]
        point["tls_over_plaintext_throughput_by_round"] = [round(r, 3) for r in by_round]
        point["tls_over_plaintext_throughput_median_of_rounds"] = statistics.median(by_round)
        point["tls_added_p50_ms"] = point["tls"]["p50_ms"] - point["plaintext"]["p50_ms"]
        for kind in ("gateway", "model_server", "client"):
            metric = f"{kind}_cpu_ms_per_call"
            if metric in point["plaintext"] and point["plaintext"][metric] > 0.001:
                point[f"tls_over_plaintext_{metric}"] = point["tls"][metric] / point["plaintext"][metric]
        points[key] = point
    results = {
        "bench": "tls_cost",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds_per_point": seconds,
        "rounds": rounds,
        "access": access,
        "model": "demo MLP 64-256-256-10, batch 1, fp32",
        "points": points,
        "new_connection_plus_one_call": connect,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,32", help="Comma-separated concurrency levels.")
    parser.add_argument(
        "--access",
        choices=["enforce", "off"],
        default="enforce",
        help="both clusters' access control (off: without the access check)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/local/tls_cost.json"))
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    asyncio.run(main(args.seconds, args.rounds, concurrencies, args.out, args.access))
