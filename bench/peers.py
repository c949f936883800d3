"""Modelyard side by side with the servers people would pick instead (NVIDIA Triton through
`nvidia-pytriton`, Seldon MLServer), on the same reference models and the same load
generators, in one command. An optional extra: the peers live in their own virtual
environment (about 1.4 GB, `/tmp/peers/venv`), never in Modelyard's.

It reuses, by calling them, the shared peer benchmark and the gateway benchmark:

1. `../shared/bench/run_peers.sh OUT/peers`: installs the peers' venv if needed, builds the
   reference models (`mlp`, `cnn`), serves them with PyTriton and MLServer, drives them with
   perf_analyzer (`pa`) and `loadgen.py` (`py`) at 1, 8 and 64 concurrent callers
   (about 12-15 minutes). `--peers-results DIR` reuses an earlier run instead
   (e.g. `../shared/bench/results/run2`).
2. `bench/gateway_bench.py --loader pa|py`: a local Modelyard cluster serving the same models,
   driven by the same loaders through the gateway (OIP `ModelInfer`) and straight at the
   model server.
3. One table (Markdown) and one JSON with every point: `OUT/peers_table.md`,
   `OUT/peers_comparison.json`.

    .venv/bin/python bench/peers.py                                   # everything
    .venv/bin/python bench/peers.py --peers-results ../shared/bench/results/run2
    .venv/bin/python bench/peers.py --peers-results ../shared/bench/results/run2 \
        --models mlp --concurrency 1 --seconds 1 --warmup 0.5 --loaders py   # a few-second check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED_BENCH = REPO.parent / "shared" / "bench"
GATEWAY_BENCH = REPO / "bench" / "gateway_bench.py"
LOADER_NAMES = {"pa": "perf_analyzer", "py": "py-grpc.aio"}
# run_peers.sh's own bound is about 15 minutes; past this something hangs.
PEERS_TIMEOUT_S = 40 * 60


def peers_env() -> dict[str, str]:
    """PEERS_ROOT, PEERS_PY, PEERS_PA, PEERS_CUDART as `peers_env.sh` defines them."""
    script = (
        f'. "{SHARED_BENCH / "peers_env.sh"}"; echo "$PEERS_ROOT"; echo "$PEERS_PY"; '
        'echo "$PEERS_PA"; echo "$PEERS_CUDART"'
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    lines = done.stdout.split("\n")
    return dict(zip(("PEERS_ROOT", "PEERS_PY", "PEERS_PA", "PEERS_CUDART"), lines, strict=False))


def run_peers(out: Path, skip_install: bool) -> Path:
    """Run the shared peer benchmark into `out`; return the directory with its results.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SKIP_INSTALL="1" if skip_install else os.environ.get("SKIP_INSTALL", "0"))
    with (out / "run_peers.out").open("w") as log:
        done = subprocess.run(
            ["bash", str(SHARED_BENCH / "run_peers.sh"), str(out)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=PEERS_TIMEOUT_S,
        )
    if done.returncode != 0 or not (out / "results.jsonl").exists():
        raise SystemExit(f"run_peers.sh failed ({done.returncode}); see {out / 'run_peers.out'}")
    return out


def peer_rows(results_dir: Path) -> list[dict[str, Any]]:
    """The measured points of a run_peers.sh run (warm-ups and probes left out)."""
    rows = []
    for line in (results_dir / "results.jsonl").read_text().splitlines():
        if not line.strip().startswith("{"):
            continue
        row = json.loads(line)
        if row.get("throughput") is None or "probe" in row.get("tag", ""):
            continue
        rows.append(
            {
                "server": row["server"],
                "workload": row["workload"],
                "loader": row["loader"],
                "concurrency": row["concurrency"],
                "throughput": row["throughput"],
                "p50_us": row.get("p50_us"),
                "p99_us": row.get("p99_us"),
                "repeat": row.get("tag", "").endswith("_rep"),
                "source": str(results_dir),
            }
        )
    return rows


def run_modelyard(
    out: Path, loader: str, args: argparse.Namespace, env: dict[str, str]
) -> list[dict[str, Any]]:
    """One gateway_bench.py run with `loader`; its points as rows for the gateway, direct and
    bare-proxy paths."""
    report_path = out / f"modelyard_{loader}.json"
    command = [
        sys.executable,
        str(GATEWAY_BENCH),
        "--loader",
        loader,
        "--models",
        args.models,
        "--concurrency",
        args.concurrency,
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--out",
        str(report_path),
    ]
    with (out / f"modelyard_{loader}.out").open("w") as log:
        # The same perf_analyzer binary as the peers' run (gateway_bench.py reads these).
        bench_env = dict(
            os.environ, PEERS_PA=env.get("PEERS_PA", ""), PEERS_CUDART=env.get("PEERS_CUDART", "")
        )
        done = subprocess.run(
            command, cwd=REPO, env=bench_env, stdout=log, stderr=subprocess.STDOUT, timeout=30 * 60
        )
    if done.returncode != 0:
        raise SystemExit(f"gateway_bench.py --loader {loader} failed; see {out / f'modelyard_{loader}.out'}")
    report = json.loads(report_path.read_text())
    rows = []
    for point in report["points"]:
        for path, server in PATHS:
            result = point.get(path)
            if result is None:
                continue
            rows.append(
                {
                    "server": server,
                    "workload": point["model"],
                    "loader": LOADER_NAMES[loader],
                    "concurrency": point["concurrency"],
                    "throughput": result["throughput"],
                    "p50_us": result.get("p50_us"),
                    "p99_us": result.get("p99_us"),
                    "server_cpu_pct": result.get("server_cpu_pct"),
                    "repeat": False,
                    "source": str(report_path),
                }
            )
    return rows


PATHS = (
    ("gateway", "modelyard (gateway)"),
    ("direct", "modelyard (model server)"),
    ("proxy", "bare grpc.aio proxy → model server"),
)


def _ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.1f}"


SERVER_ORDER = [
    "modelyard (gateway)",
    "modelyard (model server)",
    "bare grpc.aio proxy → model server",
    "pytriton",
    "pytriton-i2",
    "mlserver-w0",
    "mlserver-w1",
    "echo-v2",
    "echo-raw",
]


def _cells(rows: list[dict[str, Any]], servers: list[str]) -> list[str]:
    lines = [
        "| workload | loader | callers | " + " | ".join(servers) + " |",
        "|---|---|---:|" + "---:|" * len(servers),
    ]
    points = sorted({(r["workload"], r["loader"], r["concurrency"]) for r in rows})
    for workload, loader, concurrency in points:
        cells = []
        for server in servers:
            found = [
                r
                for r in rows
                if (r["server"], r["workload"], r["loader"], r["concurrency"])
                == (server, workload, loader, concurrency)
                and not r["repeat"]
            ]
            cells.append(
                "-"
                if not found
                else (
                    f"{found[0]['throughput']:.0f}/s, p50 {_ms(found[0]['p50_us'])}, "
                    f"p99 {_ms(found[0]['p99_us'])} ms"
                )
            )
        lines.append(f"| {workload} | {loader} | {concurrency} | " + " | ".join(cells) + " |")
    return lines


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: the reference models with servers side by side, then the no-model floor."""

    def order(server: str) -> tuple[int, str]:
        return (SERVER_ORDER.index(server) if server in SERVER_ORDER else len(SERVER_ORDER), server)

    models = [r for r in rows if r["workload"] in ("mlp", "cnn")]
    floor = [r for r in rows if r["workload"] not in ("mlp", "cnn")]
    lines = ["infer/s, p50 and p99 latency; batch-1 requests over gRPC on 127.0.0.1", ""]
    lines += _cells(models, sorted({r["server"] for r in models}, key=order))
    if floor:
        lines += ["", "No model at all (the Python grpc.aio floor on this machine):", ""]
        lines += _cells(floor, sorted({r["server"] for r in floor}, key=order))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=(REPO / "bench" / "results" / "local" / f"peers-{time.strftime('%Y%m%d-%H%M%S')}"),
    )
    parser.add_argument(
        "--peers-results",
        type=Path,
        default=None,
        help="reuse this run_peers.sh results dir instead of running the peers",
    )
    parser.add_argument("--skip-install", action="store_true", help="reuse the peers' venv as it is")
    parser.add_argument(
        "--loaders",
        default="auto",
        help="pa, py or pa,py for Modelyard; auto: both if perf_analyzer is installed",
    )
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per point")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up per point (py loader)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    peers_dir = args.peers_results or run_peers(args.out / "peers", args.skip_install)
    rows = peer_rows(peers_dir)
    env = peers_env()
    if args.loaders == "auto":
        loaders = ["pa", "py"] if Path(env.get("PEERS_PA", "")).exists() else ["py"]
    else:
        loaders = args.loaders.split(",")
    for loader in loaders:
        rows.extend(run_modelyard(args.out, loader, args, env))

    markdown = table(rows)
    (args.out / "peers_table.md").write_text(markdown + "\n")
    (args.out / "peers_comparison.json").write_text(
        json.dumps(
            {
                "benchmark": "peers",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                },
                "peers_results": str(peers_dir),
                "modelyard_loaders": loaders,
                "seconds_per_point": args.seconds,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(markdown)
    print(f"\nJSON: {args.out / 'peers_comparison.json'}; table: {args.out / 'peers_table.md'}")


if __name__ == "__main__":
    main()
