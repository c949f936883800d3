"""Same-run A/B of two commits: the model server (or the gateway) of this working tree against
the same service at another commit, both in one cluster, driven alternately.

On a shared, noisy machine, runs minutes apart differ by 10-15 %; two services measured in
interleaved rounds of one run do not. This starts a local cluster from this tree (as
`gateway_bench.py` does), checks out `--base` into a temporary `git worktree`, starts that
commit's `model_server` (or `gateway`) joined to the same cluster (same Redis, its own id and
port), waits until both answer what in-process torch answers, then drives them with
perf_analyzer in `--rounds` rounds, swapping which goes first each round. Per point:
throughput, p50/p99, and CPU per call of the service under test (from /proc, the figure that
holds up best against noise). Writes JSON and prints a summary with the ratios (this tree /
base).

    .venv/bin/python bench/ab.py --base HEAD~1 --models cnn --concurrency 64
    .venv/bin/python bench/ab.py --base main --service gateway --models mlp --concurrency 1,64
    .venv/bin/python bench/ab.py --base HEAD --service gateway --concurrency 1,64 \
        --base-env MODELYARD_GATEWAY_ACCESS__MODE=off       # what the access check costs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_bench as gb  # noqa: E402 - a sibling script, not a package

from modelyard_cli.demo import register_model  # noqa: E402
from modelyard_cli.local_cluster import Child, LocalCluster  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PREFIX = {"model_server": "MODELYARD_MODEL_SERVER_", "gateway": "MODELYARD_GATEWAY_"}


def start_base(
    child: Child, tree: Path, port: int, log: Path, extra_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """The same service as `child`, from the worktree at `tree`, joined to the same cluster,
    with `extra_env` on top (`--base-env`)."""
    prefix = PREFIX[child.kind]
    env = dict(child.env)
    env.update(
        {
            f"{prefix}SERVICE_ID": f"{child.kind.replace('_', '-')}-ab-base",
            f"{prefix}SERVER__PORT": str(port),
            f"{prefix}SERVER__METRICS_PORT": str(port + 1000),
            "PYTHONPATH": str(tree),
            **extra_env,
        }
    )
    return subprocess.Popen(
        [sys.executable, "-m", child.module],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def summary(points: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | callers | infer/s this / base | ratio | CPU ms/call this / base | ratio "
        "| p99 ms this / base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model, concurrency in sorted({(p["model"], p["concurrency"]) for p in points}):
        side = {
            s: [p for p in points if (p["model"], p["concurrency"], p["side"]) == (model, concurrency, s)]
            for s in ("this", "base")
        }
        rps = {s: statistics.mean(p["throughput"] for p in side[s]) for s in side}
        cpu = {s: statistics.mean(p["cpu_ms_per_call"] for p in side[s]) for s in side}
        p99 = {s: statistics.mean(p["p99_us"] for p in side[s]) / 1000 for s in side}
        lines.append(
            f"| {model} | {concurrency} | {rps['this']:.0f} / {rps['base']:.0f} "
            f"| {rps['this'] / rps['base']:.3f} "
            f"| {cpu['this']:.3f} / {cpu['base']:.3f} | {cpu['this'] / cpu['base']:.3f} "
            f"| {p99['this']:.1f} / {p99['base']:.1f} |"
        )
    return lines


async def main(args: argparse.Namespace) -> None:
    pa = gb.perf_analyzer()
    if pa is None:
        raise SystemExit("perf_analyzer not found: run ../shared/bench/peers_env.sh or set PEERS_PA")
    base_rev = subprocess.run(
        ["git", "rev-parse", args.base], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as tmp:
        tmp_path = Path(tmp)
        tree = tmp_path / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(tree), base_rev], cwd=REPO, check=True
        )
        specs = gb.make_models(tmp_path / "models")
        env = {"MODELYARD_LOG_LEVEL": "WARNING", **dict(item.split("=", 1) for item in args.env)}
        cluster = LocalCluster(data_dir=tmp_path / "cluster", ports="free", env=env, access=args.access)
        base: subprocess.Popen[bytes] | None = None
        points: list[dict[str, Any]] = []
        try:
            await cluster.start()
            child = next(c for c in cluster.children if c.kind == args.service)
            assert child.process is not None
            port = free_port()
            base_env = dict(item.split("=", 1) for item in args.base_env)
            base = start_base(child, tree, port, tmp_path / "base.log", base_env)
            token = gb.cluster_tokens(cluster)[args.service]
            targets = {"this": (child.address, child.process.pid), "base": (f"127.0.0.1:{port}", base.pid)}
            models = args.models.split(",")
            for model in models:
                spec = specs[model]
                artifact = tmp_path / "models" / f"{model}.pt"
                await register_model(
                    cluster.address_of("registry"),
                    model,
                    artifact.read_bytes(),
                    gb.signature(spec["input_shape"], spec["output_shape"]),
                    token=cluster.api_key,
                )
                module = torch.jit.load(str(artifact)).eval()
                for address, _ in targets.values():
                    await gb.wait_and_check(address, model, module, spec["input_shape"], token=token)
            order = ["this", "base"]
            for round_ in range(args.rounds):
                for model in models:
                    for concurrency in (int(c) for c in args.concurrency.split(",")):
                        for side in order:
                            address, pid = targets[side]
                            before, started = gb.cpu_s(pid), time.monotonic()
                            result = await asyncio.to_thread(
                                gb.run_pa, pa, address, model, concurrency, args.seconds, tmp_path, token
                            )
                            elapsed = time.monotonic() - started
                            calls = max(result["throughput"] * elapsed, 1.0)
                            result.update(
                                side=side,
                                round=round_,
                                model=model,
                                concurrency=concurrency,
                                cpu_ms_per_call=(gb.cpu_s(pid) - before) / calls * 1000,
                            )
                            points.append(result)
                            print(
                                f"round {round_} {side:4s} {model} c{concurrency}: "
                                f"{result['throughput']:.0f}/s p99 {result['p99_us'] / 1000:.1f} ms "
                                f"CPU {result['cpu_ms_per_call']:.3f} ms/call",
                                flush=True,
                            )
                order.reverse()  # whoever went second goes first next round
        finally:
            if base is not None:
                base.kill()
                base.wait()
            await cluster.stop()
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
    report = {
        "benchmark": "ab",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "service": args.service,
        "base": base_rev,
        "cpus": os.cpu_count(),
        "env": args.env,
        "base_env": args.base_env,
        "access": args.access,
        "points": points,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n" + "\n".join(summary(points)))
    print(f"\nthis tree vs {args.base} ({base_rev[:10]}); JSON: {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    parser.add_argument("--service", choices=sorted(PREFIX), default="model_server")
    parser.add_argument(
        "--base-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the base service only, e.g. MODELYARD_GATEWAY_ACCESS__MODE=off to"
        " measure the access check against the same commit",
    )
    parser.add_argument(
        "--access",
        choices=["enforce", "off"],
        default="enforce",
        help="the cluster's access control; off for a --base older than access control (its"
        " services send no service token)",
    )
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--concurrency", default="64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per point")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the cluster and the base service",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "local" / "ab.json")
    asyncio.run(main(parser.parse_args()))
