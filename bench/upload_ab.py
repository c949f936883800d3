"""Same-run A/B of the registry's upload throughput: this tree against another commit.

Issue 16 put a static inspection of every archive (and an optional signature check) on the
upload path; this measures what that costs on a large artifact. It exports `--base` with
`git archive` into a temporary directory (no worktree is registered), starts that commit's
registry and this tree's registry as child processes on one embedded Redis, each with its own
data directory, and uploads the same real TorchScript artifact (`--mb` MB of weights) to each
in `--rounds` interleaved rounds, swapping which goes first each round. Reports the median
upload time and throughput of each and the ratio (this tree / base), and writes JSON.

    .venv/bin/python bench/upload_ab.py --base 4340f03 --mb 100 --rounds 7 --out upload_ab.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch

from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1.registry_service_pb2_grpc import RegistryServiceStub
from modelyard_cli.embedded_redis import RedisServer

REPO = Path(__file__).resolve().parents[1]
CHUNK = 1024 * 1024


class Wide(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def artifact(megabytes: int) -> bytes:
    """A real TorchScript archive of about `megabytes` MB (one square Linear layer)."""
    width = int((megabytes * 1e6 / 4) ** 0.5)
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Wide(width).eval()), buffer)
    return buffer.getvalue()


def export_tree(commit: str, target: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_registry(
    tree: Path, data_dir: Path, redis_url: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(tree),
            "MODELYARD_REGISTRY_SERVER__PORT": str(port),
            "MODELYARD_REGISTRY_SERVER__METRICS_PORT": str(free_port()),
            "MODELYARD_REGISTRY_REDIS__URL": redis_url,
            "MODELYARD_REGISTRY_DATA_DIR": str(data_dir),
            "MODELYARD_REGISTRY_MAX_ARTIFACT_BYTES": str(4 * 1024**3),
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "registry_service"],
        cwd=tree,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"127.0.0.1:{port}"


async def wait_ready(stub: Any, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while True:
        try:
            await stub.ListModels(reg.ListModelsRequest(), timeout=2.0)
            return
        except grpc.aio.AioRpcError:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


SIGNATURE = tensor_pb2.Signature(
    inputs=[tensor_pb2.TensorSpec(name="input", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
    outputs=[tensor_pb2.TensorSpec(name="output", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 1])],
)


async def upload_once(stub: Any, data: bytes, sha256: str) -> float:
    async def requests() -> AsyncIterator[reg.UploadModelVersionRequest]:
        yield reg.UploadModelVersionRequest(
            metadata=reg.UploadModelVersionMetadata(
                model="big",
                format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                sha256=sha256,
                signature=SIGNATURE,
            )
        )
        view = memoryview(data)
        for start in range(0, len(data), CHUNK):
            yield reg.UploadModelVersionRequest(chunk=bytes(view[start : start + CHUNK]))

    started = time.perf_counter()
    await stub.UploadModelVersion(requests(), timeout=600)
    return time.perf_counter() - started


async def run(args: argparse.Namespace) -> dict[str, Any]:
    data = artifact(args.mb)
    sha256 = hashlib.sha256(data).hexdigest()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with tempfile.TemporaryDirectory(prefix="upload-ab-") as tmp, RedisServer() as redis:
        root = Path(tmp)
        base_tree = export_tree(args.base, root / "base")
        trees = {"this": REPO, "base": base_tree}
        processes: dict[str, subprocess.Popen[bytes]] = {}
        channels: dict[str, grpc.aio.Channel] = {}
        try:
            stubs: dict[str, Any] = {}
            for name, tree in trees.items():
                process, address = start_registry(
                    tree, root / f"data-{name}", redis.url, root / f"{name}.log"
                )
                processes[name] = process
                channels[name] = grpc.aio.insecure_channel(address, options=options)
                stubs[name] = RegistryServiceStub(channels[name])
            for stub in stubs.values():
                await wait_ready(stub)
                await stub.CreateModel(reg.CreateModelRequest(name="big"))
            # One warm-up upload each (page cache, first-call costs), not counted.
            for stub in stubs.values():
                await upload_once(stub, data, sha256)
            times: dict[str, list[float]] = {"this": [], "base": []}
            for round_ in range(args.rounds):
                order = ["this", "base"] if round_ % 2 == 0 else ["base", "this"]
                for name in order:
                    times[name].append(await upload_once(stubs[name], data, sha256))
        finally:
            for channel in channels.values():
                await channel.close()
            for process in processes.values():
                process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
    megabytes = len(data) / 1e6
    result: dict[str, Any] = {
        "base": args.base,
        "head": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip(),
        "artifact_bytes": len(data),
        "rounds": args.rounds,
        "seconds": times,
    }
    for name in ("this", "base"):
        median = statistics.median(times[name])
        result[f"{name}_median_s"] = round(median, 4)
        result[f"{name}_mb_per_s"] = round(megabytes / median, 1)
    result["throughput_ratio_this_over_base"] = round(result["this_mb_per_s"] / result["base_mb_per_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="4340f03", help="the commit to compare with")
    parser.add_argument("--mb", type=int, default=100, help="artifact size in MB")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
