"""Migration throughput and memory: export and import one large artifact through the CLI.

For each size, two fresh registries (`python -m registry_service`, each with its own embedded
Redis) are started; a TorchScript module whose buffer makes its artifact that large is
uploaded to the first; then the CLI runs `models export` (registry -> file), `models import`
(file -> second registry) and `models migrate` (first registry -> a third, fresh one,
streamed). Reported per step: MB/s, the CLI process's peak RSS (its VmHWM) and the
registries' peak RSS (VmHWM), so that running two sizes shows whether memory grows with the
artifact (it must not: everything is streamed in chunks of at most 1 MiB).

    .venv/bin/python bench/migrate_bench.py --sizes-mib 128,1024 --out bench/results/migrate.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from modelyard_cli.embedded_redis import RedisServer

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "modelyard_cli.app"]


class _Padded(torch.nn.Module):
    def __init__(self, pad_floats: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 2)
        self.register_buffer("pad", torch.zeros(pad_floats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def make_artifact(path: Path, size_mib: int) -> int:
    torch.jit.save(torch.jit.script(_Padded(size_mib * 1024 * 1024 // 4)), str(path))
    return path.stat().st_size


def vm_hwm_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(found.group(1)) if found else 0


class Registry:
    def __init__(self, root: Path, name: str) -> None:
        self.redis = RedisServer()
        self.redis.__enter__()
        self.log = root / f"{name}.log"
        env = {
            **os.environ,
            "MODELYARD_REGISTRY_DATA_DIR": str(root / name),
            "MODELYARD_REGISTRY_SERVER__PORT": "0",
            "MODELYARD_REGISTRY_REDIS__URL": self.redis.url,
            "MODELYARD_REGISTRY_ACCESS__MODE": "off",
            "MODELYARD_REGISTRY_MAX_ARTIFACT_BYTES": str(8 * 1024**3),
        }
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registry_service"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            found = re.search(r"serving on (\S+:\d+)", self.log.read_text(errors="replace"))
            if found:
                self.address = found.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the registry did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def peak_rss_mib(self) -> float:
        return vm_hwm_kib(self.proc.pid) / 1024

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.redis.__exit__(None, None, None)


def cli(*args: str) -> tuple[float, float, str]:
    """Run the CLI; (wall s, peak RSS MiB, output).

    The peak is the child's VmHWM, polled until it exits: `wait4`'s ru_maxrss would not do,
    as Linux carries the forking parent's high-water mark (this process holds torch) across exec.
    """
    started = time.monotonic()
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            [*CLI, *args],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MODELYARD_API_KEY": "none"},
        )
        peak_kib = 0
        while proc.poll() is None:
            try:
                peak_kib = max(peak_kib, vm_hwm_kib(proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        output.seek(0)
        text = output.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{text}")
    return elapsed, peak_kib / 1024, text


def run_size(size_mib: int, root: Path) -> dict[str, Any]:
    artifact = root / f"model-{size_mib}.pt"
    size = make_artifact(artifact, size_mib)
    a, b, c = Registry(root, "a"), Registry(root, "b"), Registry(root, "c")
    try:
        cli("models", "create", "big", "--registry", a.address)
        signature = ["--input", "input:fp32:-1,8", "--output", "output:fp32:-1,2"]
        cli("models", "upload", "big", str(artifact), *signature, "--registry", a.address)
        artifact.unlink()
        a_after_upload = a.peak_rss_mib()
        bundle = root / "big.bundle"
        export_s, export_rss, _ = cli("models", "export", "big", "-o", str(bundle), "--registry", a.address)
        bundle_bytes = bundle.stat().st_size
        import_s, import_rss, _ = cli("models", "import", str(bundle), "--registry", b.address)
        bundle.unlink()
        migrate_s, migrate_rss, _ = cli(
            "models", "migrate", "big", "--registry", a.address, "--to", c.address
        )
        mb = bundle_bytes / 1e6

        def step(seconds: float, rss: float) -> dict[str, float]:
            return {
                "s": round(seconds, 2),
                "MB_per_s": round(mb / seconds, 1),
                "cli_peak_rss_mib": round(rss, 1),
            }

        return {
            "artifact_bytes": size,
            "bundle_bytes": bundle_bytes,
            "export": step(export_s, export_rss),
            "import": step(import_s, import_rss),
            "migrate": step(migrate_s, migrate_rss),
            "registry_peak_rss_mib": {
                "source_after_upload": round(a_after_upload, 1),
                "source_after_exports": round(a.peak_rss_mib(), 1),
                "import_target": round(b.peak_rss_mib(), 1),
                "migrate_target": round(c.peak_rss_mib(), 1),
            },
        }
    finally:
        for registry in (a, b, c):
            registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mib", default="64,256", help="artifact sizes in MiB, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    for size_mib in [int(s) for s in args.sizes_mib.split(",")]:
        with tempfile.TemporaryDirectory(prefix="migrate-bench-") as tmp:
            result = {"size_mib": size_mib, **run_size(size_mib, Path(tmp))}
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.out is not None:
        args.out.write_text(json.dumps({"bench": "migrate", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
