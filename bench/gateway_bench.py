"""What the gateway's hop costs: OIP ModelInfer through the gateway vs straight to the model
server, on the reference models of ../shared/bench, at 1, 8 and 64 concurrent callers, in one
run on this machine.

Starts a local cluster (Redis, registry, one model server, gateway; free ports), registers the
reference models (`make_models.py`: mlp [B,64] and cnn [B,3,32,32], TorchScript, tensors named
INPUT__0 / OUTPUT__0 as the peers serve them), checks that both paths answer what in-process
torch answers, then drives each point with the load generator. A third path, a bare grpc.aio
proxy (`bench/bare_proxy.py`, no routing at all; `--no-floor` skips it), splits the gateway's
added latency into grpc.aio's cost of one more Python hop and what Modelyard's routing adds.
The load generators:

- `pa`: perf_analyzer (C++, --async), the binary ../shared/bench/peers_env.sh installs
  (`$PEERS_PA`, default /tmp/peers/pa/perf_analyzer-2.51.0); the peers' numbers use it too.
- `py`: ../shared/bench/loadgen.py (grpc.aio closed loop, one pre-serialised request), run by
  the tritonclient venv (`.cache/tritonclient-venv`, created here if missing).
- `auto` (default): `pa` if the binary is there, else `py`.

Writes JSON (every point, the ratios, the machine, the versions) and prints a table.

    .venv/bin/python bench/gateway_bench.py                      # the full run (~3 min)
    .venv/bin/python bench/gateway_bench.py --seconds 1 --models mlp --concurrency 1,8 --warmup 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from modelyard.access.keys import ServiceTokens
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.tls import open_channel
from modelyard.v1 import tensor_pb2
from modelyard_cli.demo import register_model
from modelyard_cli.local_cluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCH = REPO.parent / "shared" / "bench"
TRITON_VENV = REPO / ".cache" / "tritonclient-venv"
TRITON_REQUIREMENTS = ["tritonclient[grpc]==2.73.0", "protobuf==6.33.6", "grpcio==1.85.3", "numpy==2.4.6"]
CLK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def make_models(out: Path) -> dict[str, Any]:
    subprocess.run(
        [sys.executable, str(SHARED_BENCH / "make_models.py"), str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return json.loads((out / "models.json").read_text())


def signature(input_shape: list[int], output_shape: list[int]) -> tensor_pb2.Signature:
    fp32 = tensor_pb2.DATA_TYPE_FP32
    return tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="INPUT__0", data_type=fp32, shape=[-1, *input_shape])],
        outputs=[tensor_pb2.TensorSpec(name="OUTPUT__0", data_type=fp32, shape=[-1, *output_shape])],
    )


def infer_request(model: str, x: np.ndarray) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model, id="check")
    request.inputs.add(name="INPUT__0", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


async def wait_and_check(
    address: str,
    model: str,
    module: torch.jit.ScriptModule,
    input_shape: list[int],
    timeout_s: float = 120.0,
    token: str | None = None,
) -> float:
    """Wait until `address` serves the model; return max |diff| against in-process torch."""
    x = np.random.default_rng(1).standard_normal([2, *input_shape], dtype=np.float32)
    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    end = time.monotonic() + timeout_s
    async with open_channel(address, None, token=token) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        while True:
            try:
                answer = await call(infer_request(model, x), timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > end:
                    raise RuntimeError(f"{address} never served {model}: {exc.details()}") from exc
                await asyncio.sleep(0.2)
    got = np.frombuffer(answer.raw_output_contents[0], dtype=np.float32).reshape(expected.shape)
    return float(np.abs(got - expected).max())


def triton_python() -> Path:
    python = TRITON_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRITON_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRITON_REQUIREMENTS], check=True)
    return python


def perf_analyzer() -> Path | None:
    path = Path(os.environ.get("PEERS_PA", "/tmp/peers/pa/perf_analyzer-2.51.0"))
    return path if path.exists() else None


def cluster_tokens(cluster: LocalCluster) -> dict[str, str | None]:
    """The credentials each path is called with: an API key at the gateway, a service token
    (what the gateway itself sends) direct to a model server; none with access control off."""
    if cluster.access != "enforce":
        return {"gateway": None, "model_server": None, "direct": None}
    service = ServiceTokens(cluster.secret_file.read_bytes().strip()).token("gateway")
    return {"gateway": cluster.api_key, "model_server": service, "direct": service}


def run_pa(
    pa: Path, address: str, model: str, concurrency: int, seconds: float, out: Path, token: str | None = None
) -> dict[str, Any]:
    csv_path = out / f"pa_{model}_{address.replace(':', '_')}_{concurrency}.csv"
    env = dict(os.environ)
    # Where ../shared/bench/peers_env.sh puts libcudart.so.12 (perf_analyzer links it).
    cudart = os.environ.get("PEERS_CUDART", str(pa.parent / "cudart/nvidia/cuda_runtime/lib"))
    env["LD_LIBRARY_PATH"] = f"{cudart}:{env.get('LD_LIBRARY_PATH', '')}"
    done = subprocess.run(
        [
            str(pa),
            "-m",
            model,
            "-i",
            "grpc",
            "-u",
            address,
            "--async",
            "--concurrency-range",
            str(concurrency),
            "-p",
            str(int(seconds * 1000)),
            "-s",
            "1000",
            "-r",
            "3",
            "-f",
            str(csv_path),
            *(["-H", f"authorization:Bearer {token}"] if token else []),
        ],
        capture_output=True,
        text=True,
        timeout=90 + 10 * seconds,
        env=env,
    )
    if done.returncode != 0 or not csv_path.exists():
        raise RuntimeError(
            f"perf_analyzer failed ({done.returncode}): {done.stdout[-800:]}{done.stderr[-800:]}"
        )
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    return {
        "throughput": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p99_us": float(row["p99 latency"]),
        "errors": {},
    }


def run_py(
    python: Path, address: str, model: str, shape: list[int], concurrency: int, seconds: float, warmup: float
) -> dict[str, Any]:
    done = subprocess.run(
        [
            str(python),
            str(SHARED_BENCH / "loadgen.py"),
            "--url",
            address,
            "--model",
            model,
            "--shape",
            ",".join(map(str, shape)),
            "--concurrency",
            str(concurrency),
            "--warmup",
            str(warmup),
            "--duration",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=warmup + seconds + 60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class BareProxy:
    """`bench/bare_proxy.py` in a child process: the grpc.aio floor of one more hop."""

    def __init__(self, upstream: str, log: Path, token: str | None = None) -> None:
        self._log = open(log, "w")  # noqa: SIM115 - closed in kill()
        # The token upstream (what the gateway sends), in the environment: out of `ps`.
        env = dict(os.environ, **({"BARE_PROXY_UPSTREAM_TOKEN": token} if token else {}))
        self._process = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "bare_proxy.py"), "--upstream", upstream],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("listening "):
            self.kill()
            raise RuntimeError(f"bare_proxy.py did not start; see {log}")
        self.address = line.split()[1]
        self.pid = self._process.pid

    def kill(self) -> None:
        self._process.kill()
        self._process.wait()
        self._log.close()


def table(points: list[dict[str, Any]]) -> str:
    floor = any("proxy" in p for p in points)
    lines = [
        "| model | callers | direct infer/s | gateway infer/s | ratio | direct p50 ms | gateway p50 ms "
        "| added p50 ms | direct p99 ms | gateway p99 ms | server CPU % (direct / gateway path) |"
        + (" bare proxy infer/s | bare proxy added p50 ms |" if floor else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if floor else ""),
    ]
    for p in points:
        d, g = p["direct"], p["gateway"]
        line = (
            f"| {p['model']} | {p['concurrency']} | {d['throughput']:.0f} | {g['throughput']:.0f} "
            f"| {p['throughput_ratio']:.2f} | {d['p50_us'] / 1000:.2f} | {g['p50_us'] / 1000:.2f} "
            f"| {p['added_p50_ms']:+.2f} | {d['p99_us'] / 1000:.2f} | {g['p99_us'] / 1000:.2f} "
            f"| {d['server_cpu_pct']:.0f} / {g['server_cpu_pct']:.0f} |"
        )
        if "proxy" in p:
            line += f" {p['proxy']['throughput']:.0f} | {p['proxy_added_p50_ms']:+.2f} |"
        elif floor:
            line += " | |"
        lines.append(line)
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    pa = perf_analyzer() if args.loader in ("auto", "pa") else None
    if args.loader == "pa" and pa is None:
        raise SystemExit("perf_analyzer not found: run ../shared/bench/peers_env.sh or set PEERS_PA")
    loader = "pa" if pa is not None else "py"
    python = triton_python() if loader == "py" else None
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        tmp_path = Path(tmp)
        specs = make_models(tmp_path / "models")
        env = {"MODELYARD_LOG_LEVEL": "WARNING"}
        env.update(dict(item.split("=", 1) for item in args.env))
        if args.access == "enforce" and loader == "py":
            raise SystemExit(
                "the py loader (../shared/bench/loadgen.py) sends no credentials: add --access off,"
                " or install perf_analyzer (../shared/bench/peers_env.sh)"
            )
        cluster = LocalCluster(data_dir=tmp_path / "cluster", ports="free", env=env, access=args.access)
        await cluster.start()
        tokens = cluster_tokens(cluster)
        stack = contextlib.ExitStack()
        try:
            gateway = next(c for c in cluster.children if c.kind == "gateway")
            server = next(c for c in cluster.children if c.kind == "model_server")
            assert gateway.process is not None and server.process is not None
            checks: dict[str, Any] = {}
            for model in args.models.split(","):
                spec = specs[model]
                artifact = (tmp_path / "models" / f"{model}.pt").read_bytes()
                await register_model(
                    cluster.address_of("registry"),
                    model,
                    artifact,
                    signature(spec["input_shape"], spec["output_shape"]),
                    token=cluster.api_key,
                )
                module = torch.jit.load(str(tmp_path / "models" / f"{model}.pt")).eval()
                checks[model] = {
                    "gateway_max_abs_diff": await wait_and_check(
                        cluster.gateway_address, model, module, spec["input_shape"], token=tokens["gateway"]
                    ),
                    "direct_max_abs_diff": await wait_and_check(
                        server.address, model, module, spec["input_shape"], token=tokens["model_server"]
                    ),
                }
            paths = [
                ("direct", server.address, [server.process.pid]),
                ("gateway", cluster.gateway_address, [server.process.pid, gateway.process.pid]),
            ]
            if args.floor:
                proxy = BareProxy(server.address, tmp_path / "bare_proxy.log", tokens["direct"])
                stack.callback(proxy.kill)
                paths.append(("proxy", proxy.address, [server.process.pid, proxy.pid]))
                for model in args.models.split(","):
                    spec = specs[model]
                    module = torch.jit.load(str(tmp_path / "models" / f"{model}.pt")).eval()
                    checks[model]["proxy_max_abs_diff"] = await wait_and_check(
                        proxy.address, model, module, spec["input_shape"]
                    )
            points = []
            for model in args.models.split(","):
                for concurrency in concurrencies:
                    point: dict[str, Any] = {"model": model, "concurrency": concurrency}
                    for path, address, pids in paths:
                        before, started = sum(cpu_s(p) for p in pids), time.monotonic()
                        if pa is not None:
                            result = await asyncio.to_thread(
                                run_pa,
                                pa,
                                address,
                                model,
                                concurrency,
                                args.seconds,
                                tmp_path,
                                tokens.get(path),
                            )
                        else:
                            assert python is not None
                            result = await asyncio.to_thread(
                                run_py,
                                python,
                                address,
                                model,
                                specs[model]["input_shape"],
                                concurrency,
                                args.seconds,
                                args.warmup,
                            )
                        elapsed = time.monotonic() - started
                        result["server_cpu_pct"] = 100 * (sum(cpu_s(p) for p in pids) - before) / elapsed
                        point[path] = result
                    direct_rps = max(point["direct"]["throughput"], 1e-9)
                    point["throughput_ratio"] = point["gateway"]["throughput"] / direct_rps
                    point["added_p50_ms"] = (point["gateway"]["p50_us"] - point["direct"]["p50_us"]) / 1000
                    if "proxy" in point:
                        # The hop split in two: grpc.aio's own (a bare proxy) and Modelyard's.
                        point["proxy_added_p50_ms"] = (
                            point["proxy"]["p50_us"] - point["direct"]["p50_us"]
                        ) / 1000
                        point["gateway_over_proxy_p50_ms"] = (
                            point["gateway"]["p50_us"] - point["proxy"]["p50_us"]
                        ) / 1000
                    points.append(point)
                    floor = (
                        f"; bare proxy {point['proxy']['throughput']:.0f}/s "
                        f"({point['proxy_added_p50_ms']:+.2f} ms p50)"
                        if "proxy" in point
                        else ""
                    )
                    print(
                        f"{model} c{concurrency}: direct {point['direct']['throughput']:.0f}/s, "
                        f"gateway {point['gateway']['throughput']:.0f}/s "
                        f"({point['throughput_ratio']:.2f}x, {point['added_p50_ms']:+.2f} ms p50){floor}",
                        flush=True,
                    )
        finally:
            stack.close()
            await cluster.stop()
    report = {
        "benchmark": "gateway_bench",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "loader": loader,
        "perf_analyzer": str(pa) if pa else None,
        "seconds_per_point": args.seconds,
        "cluster_env": args.env,
        "access": args.access,
        "correctness": checks,
        "points": points,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(points))
    print(f"\nloader: {loader}; JSON: {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per point (py loader)")
    parser.add_argument("--loader", choices=["auto", "pa", "py"], default="auto")
    parser.add_argument(
        "--access",
        choices=["enforce", "off"],
        default="enforce",
        help="the cluster's access control (enforce: the gateway path carries the admin key, the"
        " direct path a service token, as the gateway sends)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra cluster environment, e.g. MODELYARD_GATEWAY_COALESCE_ENABLED=false",
    )
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the bare grpc.aio proxy (bench/bare_proxy.py) path",
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "local" / "gateway_bench.json"
    )
    asyncio.run(main(parser.parse_args()))
