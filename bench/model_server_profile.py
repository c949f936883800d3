"""Python function calls per request on the model server's hot path, counted with cProfile.

Counts, not wall time: the number is stable on a busy machine and moves only when the code
does. Runs in-process, without the network: the servicer's handler is called as gRPC would
call it (a parsed request and a context), on one event loop, so what is counted is exactly
our Python work per request (decode, checks, queueing, batching, the worker hop, encode),
not grpc's C core.

    .venv/bin/python bench/model_server_profile.py [--requests 2000] [--concurrency 1 64]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import json
import pstats
from typing import Any

import torch

from model_server.batching import BatchConfig
from model_server.loader import Artifact
from model_server.oip_servicer import OipServicer
from model_server.repository import ModelRepository
from model_server.servicer import ModelServerServicer
from modelyard import oip_codec
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import registry_pb2, tensor_pb2


class _Source:
    def __init__(self, artifact: Artifact) -> None:
        self._artifact = artifact

    async def fetch(self, model: str, version: int) -> Artifact:
        return self._artifact


class _Context:
    """What the handlers use of grpc.aio.ServicerContext on the success path."""

    def time_remaining(self) -> float | None:
        return None


def _mlp_artifact() -> Artifact:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    ).eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    data = buffer.getvalue()
    fp32 = tensor_pb2.DATA_TYPE_FP32
    signature = tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="INPUT__0", data_type=fp32, shape=[-1, 64])],
        outputs=[tensor_pb2.TensorSpec(name="OUTPUT__0", data_type=fp32, shape=[-1, 10])],
    )
    return Artifact(
        "mlp", 1, registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT, hashlib.sha256(data).hexdigest(), signature, data
    )


async def _profile(path: str, requests: int, concurrency: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    repository = ModelRepository(_Source(_mlp_artifact()), BatchConfig(max_batch_size=64))
    await repository.load("mlp", 1)
    context: Any = _Context()
    x = torch.randn(1, 64)
    if path == "oip":
        servicer: Any = OipServicer(repository, draining=lambda: False)
        request: Any = oip.ModelInferRequest(
            model_name="mlp",
            inputs=[oip.ModelInferRequest.InferInputTensor(name="INPUT__0", datatype="FP32", shape=[1, 64])],
            raw_input_contents=[oip_codec.tensor_to_raw(x)],
        )
        handler = servicer.ModelInfer
    else:
        servicer = ModelServerServicer(repository, server_id="bench", draining=lambda: False)
        request = ms.InferRequest(model="mlp", version=1, inputs=[tensor_to_proto("INPUT__0", x)])
        handler = servicer.Infer
    # The handler gets a parsed request, as from grpc's deserializer; parse per call as grpc does.
    payload = request.SerializeToString()
    parse = type(request).FromString

    async def one() -> None:
        response = await handler(parse(payload), context)
        response.SerializeToString()

    async def caller(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(50):
        await one()
    profiler = cProfile.Profile()
    profiler.enable()
    await asyncio.gather(*(caller(requests // concurrency) for _ in range(concurrency)))
    profiler.disable()
    done = (requests // concurrency) * concurrency
    await repository.aclose()
    stats = pstats.Stats(profiler)
    total_calls = sum(v[1] for v in stats.stats.values())  # type: ignore[attr-defined]
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][1], reverse=True)[:15]  # type: ignore[attr-defined]
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": done,
        "python_calls_per_request": round(total_calls / done, 1),
        "top_by_calls_per_request": [
            {"function": f"{pstats.func_std_string(func)}", "calls_per_request": round(v[1] / done, 2)}
            for func, v in top
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--paths", nargs="+", default=["oip", "infer"], choices=["oip", "infer"])
    args = parser.parse_args()
    for path in args.paths:
        for concurrency in args.concurrency:
            result = asyncio.run(_profile(path, args.requests, concurrency))
            print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
