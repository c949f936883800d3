"""The demo model of `modelyard up --demo`, and the client calls that register, promote and
query it: the same steps a user takes, over the public contracts."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import grpc
import torch
from torch import nn

from modelyard.baseline import compute_baseline
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.tls import ClientTLS, open_channel
from modelyard.v1 import inference_service_pb2 as inf
from modelyard.v1 import inference_service_pb2_grpc as inf_grpc
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1 import registry_service_pb2_grpc as reg_grpc

__all__ = [
    "build_demo_model",
    "demo_signature",
    "demo_inputs",
    "register_model",
    "predict_until_served",
    "DemoAnswer",
]

CHUNK_BYTES = 1 << 20


class DemoMLP(nn.Module):
    """float32 [N, 64] → 64-256-256-10 MLP with ReLU: the shape of work of the reference `mlp`."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def build_demo_model(seed: int = 0) -> tuple[torch.jit.ScriptModule, bytes]:
    """The demo model (deterministic for a seed) and its TorchScript archive bytes."""
    torch.manual_seed(seed)
    module = torch.jit.script(DemoMLP().eval())
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return module, buffer.getvalue()


def demo_signature() -> tensor_pb2.Signature:
    fp32 = tensor_pb2.DATA_TYPE_FP32
    return tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name="input", data_type=fp32, shape=[-1, 64])],
        outputs=[tensor_pb2.TensorSpec(name="output", data_type=fp32, shape=[-1, 10])],
    )


def demo_inputs(signature: tensor_pb2.Signature, items: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The demo's synthetic inputs: standard normal values shaped by the signature (`items` on
    dim 0, 1 for any other dynamic dimension), as `modelyard up --demo` sends them."""
    generator = torch.Generator().manual_seed(seed)
    return {
        spec.name: torch.randn(
            [items if i == 0 else (1 if d == -1 else d) for i, d in enumerate(spec.shape)],
            generator=generator,
        )
        for spec in signature.inputs
    }


async def register_model(
    registry_address: str,
    model: str,
    artifact: bytes,
    signature: tensor_pb2.Signature,
    *,
    alias: str = "production",
    description: str = "",
    baseline_sample: Mapping[str, torch.Tensor] | None = None,
    tls: ClientTLS | None = None,
    token: str | None = None,
    client: str = "demo",
) -> int:
    """Create the model if needed, upload a version with its input baseline, point `alias` at
    it; return the version.

    Args:
        baseline_sample: Input name -> items the drift baseline is computed from; None: 2000
            items of the demo's synthetic inputs (`demo_inputs`), the distribution the demo sends.
        tls: How to dial a TLS registry (None: plaintext).
        token: The API key or service token to call with (registry.write and alias.move on
            the model); `modelyard up --demo` uses the demo's own (`local_cluster.tool_token`).
        client: The name the calls claim in their user-agent (shown by the registry's audit
            only with access control off, labelled as a claim).
    """
    sample = baseline_sample if baseline_sample is not None else demo_inputs(signature, 2000)
    baselines = compute_baseline(sample)
    async with open_channel(registry_address, tls, token=token, client=client) as channel:
        stub = reg_grpc.RegistryServiceStub(channel)
        try:
            await stub.CreateModel(reg.CreateModelRequest(name=model, description=description))
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                raise

        async def upload() -> AsyncIterator[reg.UploadModelVersionRequest]:
            yield reg.UploadModelVersionRequest(
                metadata=reg.UploadModelVersionMetadata(
                    model=model,
                    format=registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
                    sha256=hashlib.sha256(artifact).hexdigest(),
                    signature=signature,
                    description=description,
                    input_baselines=baselines,
                )
            )
            for start in range(0, len(artifact), CHUNK_BYTES):
                yield reg.UploadModelVersionRequest(chunk=artifact[start : start + CHUNK_BYTES])

        uploaded = await stub.UploadModelVersion(upload())
        version = uploaded.model_version.version
        await stub.SetAlias(
            reg.SetAliasRequest(model=model, alias=alias, version=version, reason="modelyard up --demo")
        )
        return int(version)


@dataclass
class DemoAnswer:
    version: int
    output: torch.Tensor
    expected: torch.Tensor


async def predict_until_served(
    gateway_address: str,
    model: str,
    inputs: list[torch.Tensor],
    reference: torch.jit.ScriptModule | None = None,
    *,
    timeout_s: float = 60.0,
    tls: ClientTLS | None = None,
    token: str | None = None,
) -> list[DemoAnswer]:
    """Predict each input through the gateway, waiting out UNAVAILABLE while the version loads
    and NOT_FOUND until the gateway has seen the model's new alias."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    answers = []
    async with open_channel(gateway_address, tls, token=token, client="demo") as channel:
        stub = inf_grpc.InferenceServiceStub(channel)
        for x in inputs:
            request = inf.PredictRequest(model=model, inputs=[tensor_to_proto("input", x)])
            while True:
                try:
                    reply = await stub.Predict(request, timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    waiting = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
                    if not waiting or loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            output = tensor_from_proto(reply.outputs[0])
            with torch.inference_mode():
                expected = reference(x) if reference is not None else output
            answers.append(DemoAnswer(reply.version, output, expected))
    return answers
