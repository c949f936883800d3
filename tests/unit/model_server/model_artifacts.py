"""Helpers for the model server's unit tests: real tiny models as artifacts, an in-memory
`ArtifactSource` (the loader's seam), and a loop-turning wait."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Callable, Sequence

import torch

from model_server.batching import BatchTiming
from model_server.dataplane import ModelServerDataPlane
from model_server.loader import Artifact
from model_server.repository import ModelRepository
from model_server.stats import RequestStats
from modelyard.errors import VersionNotFound
from modelyard.tensor_codec import tensor_from_proto, tensor_to_proto
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.validation import WireTensor

FP32 = tensor_pb2.DATA_TYPE_FP32

SpecList = Sequence[tuple[str, int, Sequence[int]]]


def make_signature(
    inputs: SpecList = (("input", FP32, (-1, 4)),),
    outputs: SpecList = (("output", FP32, (-1, 3)),),
) -> tensor_pb2.Signature:
    return tensor_pb2.Signature(
        inputs=[tensor_pb2.TensorSpec(name=n, data_type=d, shape=s) for n, d, s in inputs],
        outputs=[tensor_pb2.TensorSpec(name=n, data_type=d, shape=s) for n, d, s in outputs],
    )


def mlp(seed: int = 0) -> torch.nn.Module:
    """4 → 8 → 3 with ReLU; different seeds give different weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.body(x)
        return y, y.argmax(dim=1)


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def export_bytes(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def make_artifact(
    data: bytes,
    *,
    model: str = "mlp",
    version: int = 1,
    signature: tensor_pb2.Signature | None = None,
    format: int = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    sha256: str | None = None,
) -> Artifact:
    return Artifact(
        model=model,
        version=version,
        format=format,
        sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
        signature=signature if signature is not None else make_signature(),
        data=data,
    )


class MemorySource:
    """Artifacts from a dict; counts fetches; `gate` (if set) holds every fetch until set."""

    def __init__(self) -> None:
        self.artifacts: dict[tuple[str, int], Artifact] = {}
        self.fetches: list[tuple[str, int]] = []
        self.gate: asyncio.Event | None = None

    def add(self, artifact: Artifact) -> None:
        self.artifacts[(artifact.model, artifact.version)] = artifact

    async def fetch(self, model: str, version: int) -> Artifact:
        self.fetches.append((model, version))
        if self.gate is not None:
            await self.gate.wait()
        try:
            return self.artifacts[(model, version)]
        except KeyError:
            raise VersionNotFound(f"no {model} v{version}") from None


async def until(condition: Callable[[], object], *, turns: int = 1000) -> None:
    """Yield to the loop until `condition()` holds (no timed sleeping)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def infer_wire(
    repository: ModelRepository,
    model: str,
    version: int,
    inputs: Sequence[tensor_pb2.Tensor],
    output_names: Sequence[str],
    deadline: float | None,
) -> tuple[list[tensor_pb2.Tensor], BatchTiming]:
    """One request through the model server's data plane, wire tensors in and out."""
    answer = await ModelServerDataPlane(repository, RequestStats(input_sample_every=0)).infer(
        model, version, [WireTensor.of(t) for t in inputs], output_names, deadline
    )
    return [tensor_to_proto(name, t) for name, t in answer.outputs], answer.timing


async def infer_torch(
    repository: ModelRepository, model: str, version: int, inputs: Sequence[tuple[str, torch.Tensor]]
) -> tuple[list[torch.Tensor], BatchTiming]:
    """One request through the data plane, torch tensors in and out."""
    wire = [tensor_to_proto(name, t) for name, t in inputs]
    outputs, timing = await infer_wire(repository, model, version, wire, [], None)
    return [tensor_from_proto(t) for t in outputs], timing
