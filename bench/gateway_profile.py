"""Where the gateway's per-request Python work goes, in call counts (not wall time, so it
reads the same on a busy machine).

Runs a gateway in this process against a stand-in model server (a real grpc.aio server that
answers Infer at once) and a real Redis, sends N sequential Predict and N ModelInfer calls,
and prints, per request, the calls of every function that ran on the gateway side under
cProfile (client and stand-in frames are left out).

    .venv/bin/python bench/gateway_profile.py [--requests 2000] [--top 40] [--concurrency 64]
        [--no-coalesce]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
from typing import Any

import grpc
import numpy as np

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from modelyard.coordination import CoordinationStore, ServiceRecord, VersionRecord
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.v1 import tensor_pb2
from modelyard_cli.embedded_redis import RedisServer

OURS = ("/gateway/", "/modelyard/", "prometheus_client/", "logging/")

SIGNATURE = {
    "inputs": [{"name": "INPUT__0", "dataType": "DATA_TYPE_FP32", "shape": ["-1", "64"]}],
    "outputs": [{"name": "OUTPUT__0", "dataType": "DATA_TYPE_FP32", "shape": ["-1", "10"]}],
}


async def main(requests: int, top: int, concurrency: int, coalesce: bool) -> None:
    output = tensor_pb2.Tensor(
        name="OUTPUT__0",
        data_type=tensor_pb2.DATA_TYPE_FP32,
        shape=[1, 10],
        raw=np.zeros(10, np.float32).tobytes(),
    )

    stand_in_calls = [0]

    async def infer(request: bytes, context: Any) -> bytes:
        stand_in_calls[0] += 1
        parsed = ms.InferRequest.FromString(request)
        rows = parsed.inputs[0].shape[0]
        out = tensor_pb2.Tensor(
            name="OUTPUT__0", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[rows, 10], raw=output.raw * rows
        )
        return ms.InferResponse(
            model=parsed.model, version=parsed.version, outputs=[out], request_id=parsed.request_id
        ).SerializeToString()

    stand_in = grpc.aio.server()
    stand_in.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "modelyard.v1.ModelServerService", {"Infer": grpc.unary_unary_rpc_method_handler(infer)}
            ),
        )
    )
    port = stand_in.add_insecure_port("127.0.0.1:0")
    await stand_in.start()
    with RedisServer() as redis_server:
        redis = RedisSettings(url=redis_server.url)
        async with CoordinationStore(redis) as store:
            await store.apply_aliases("mlp", {"production": 1}, 1)
            await store.heartbeat(
                ServiceRecord(
                    id="stand-in",
                    kind="model_server",
                    address=f"127.0.0.1:{port}",
                    versions=[VersionRecord(model="mlp", version=1, state="ready", signature=SIGNATURE)],
                ),
                ttl_s=600,
            )
        app = GatewayApp(
            load_settings(
                GatewaySettings,
                server=ServerSettings(port=0, metrics_port=0),
                redis=redis,
                coalesce_enabled=coalesce,
            )
        )
        await app.start()
        x = np.zeros((1, 64), np.float32)
        predict = inf.PredictRequest(
            model="mlp",
            inputs=[
                tensor_pb2.Tensor(
                    name="INPUT__0", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[1, 64], raw=x.tobytes()
                )
            ],
        )
        model_infer = oip.ModelInferRequest(model_name="mlp", id="p")
        model_infer.inputs.add(name="INPUT__0", datatype="FP32", shape=[1, 64])
        model_infer.raw_input_contents.append(x.tobytes())
        try:
            async with grpc.aio.insecure_channel(app.address) as channel:
                calls = {
                    "Predict": (
                        channel.unary_unary("/modelyard.v1.InferenceService/Predict"),
                        predict.SerializeToString(),
                    ),
                    "ModelInfer": (
                        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer"),
                        model_infer.SerializeToString(),
                    ),
                }
                for name, (call, payload) in calls.items():
                    for _ in range(50):  # warm caches, channels, metric children
                        await call(payload, timeout=5)

                    async def caller(count: int, call: Any = call, payload: bytes = payload) -> None:
                        for _ in range(count):
                            await call(payload, timeout=5)

                    before = stand_in_calls[0]
                    profiler = cProfile.Profile()
                    profiler.enable()
                    await asyncio.gather(*(caller(requests // concurrency) for _ in range(concurrency)))
                    profiler.disable()
                    print(
                        f"\n{name}: {requests} requests from {concurrency} callers, coalescing "
                        f"{'on' if coalesce else 'off'}: the stand-in model server got "
                        f"{stand_in_calls[0] - before} calls"
                    )
                    stats = pstats.Stats(profiler)
                    rows = []
                    entries = stats.stats.items()  # type: ignore[attr-defined]  # not in typeshed
                    for (filename, line, function), (_cc, ncalls, tottime, _ct, _callers) in entries:
                        if "bench/" in filename:
                            continue
                        where = f"{filename.split('site-packages/')[-1]}:{line}({function})"
                        rows.append((ncalls / requests, tottime / requests * 1e6, where))
                    rows.sort(reverse=True)
                    total_calls = sum(r[0] for r in rows)
                    print(
                        f"\n== {name}: {total_calls:.0f} Python-level calls per request "
                        f"(client, stand-in and gateway together) =="
                    )
                    for per_request, us, where in rows[:top]:
                        print(f"{per_request:8.2f}  {us:7.1f}us  {where}")
                    ours = [r for r in rows if any(k in r[2] for k in OURS)]
                    print(
                        f"-- of which the gateway's own code and its metrics: "
                        f"{sum(r[0] for r in ours):.0f} calls, {sum(r[1] for r in ours):.1f}us own time --"
                    )
                    for per_request, us, where in ours:
                        print(f"{per_request:8.2f}  {us:7.1f}us  {where}")
        finally:
            await app.aclose()
            await stand_in.stop(None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--no-coalesce", action="store_true")
    options = parser.parse_args()
    asyncio.run(main(options.requests, options.top, options.concurrency, not options.no_coalesce))
