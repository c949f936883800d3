"""Is memory returned when a version is unloaded? RSS before load, after load, after unload.

Loads a large TorchScript MLP (about 256 MiB of fp32 weights) through the real
`ModelRepository` (verify, deserialise, batcher, warm-up, a few requests), unloads it, and
repeats, printing the process's resident set size at each step (and CUDA memory with
`--device cuda` where a GPU exists). The artifact bytes are held by the in-memory source the
whole time, so they are part of the baseline.

    .venv/bin/python bench/model_server_memory.py [--cycles 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import io
import json
import os

import torch

from model_server.batching import BatchConfig
from model_server.dataplane import ModelServerDataPlane
from model_server.loader import Artifact
from model_server.repository import ModelRepository
from model_server.stats import RequestStats
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.validation import WireTensor

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


def cuda_mib() -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None


class _Source:
    def __init__(self, artifact: Artifact) -> None:
        self.artifact = artifact

    async def fetch(self, model: str, version: int) -> Artifact:
        return self.artifact


def big_artifact(width: int) -> Artifact:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 10),
    ).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    del module
    data = buffer.getvalue()
    fp32 = tensor_pb2.DATA_TYPE_FP32
    signature = tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="x", data_type=fp32, shape=[-1, 64])],
        outputs=[tensor_pb2.TensorSpec(name="y", data_type=fp32, shape=[-1, 10])],
    )
    return Artifact(
        "big", 1, registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, hashlib.sha256(data).hexdigest(), signature, data
    )


async def run(cycles: int, device: str, width: int) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    source = _Source(big_artifact(width))
    gc.collect()
    repository = ModelRepository(source, BatchConfig(max_batch_size=8), device=device)
    dataplane = ModelServerDataPlane(repository, RequestStats(input_sample_every=0))
    steps: list[dict[str, object]] = []

    def mark(step: str, cycle: int) -> None:
        steps.append({"cycle": cycle, "step": step, "rss_mib": round(rss_mib(), 1), "cuda_mib": cuda_mib()})
        print(json.dumps(steps[-1]), flush=True)

    mark("before load", 0)
    for cycle in range(1, cycles + 1):
        await repository.load("big", 1)
        for _ in range(10):
            x = tensor_to_proto("x", torch.randn(4, 64))
            await dataplane.infer("big", 1, [WireTensor.of(x)], [], None)
        mark("loaded, served", cycle)
        await repository.unload("big", 1)
        mark("after unload", cycle)
    await repository.aclose()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=4096, help="hidden width (4096: ~200 MiB of weights)")
    args = parser.parse_args()
    asyncio.run(run(args.cycles, args.device, args.width))


if __name__ == "__main__":
    main()
