"""Optimisation profiles against fp32 eager, in one run: items/s at batch 1 and 64, errors.

Models: the two reference models of ../shared/bench (`mlp`, `cnn`, built by its
`make_models.py` so that the weights are the peers' own) and a small transformer encoder
built here (`encoder`: 2 layers, d_model 128, 4 heads, 16 tokens, mean-pooled into a 10-class
head). Each model is saved the way a user would upload it, TorchScript (scripted) and
torch.export (batch dim dynamic), loaded back through the model server's own loader, and the
profile applied by `model_server.optimization.Optimizer`: exactly what a deployment gets.

The reference is the fp32 eager `nn.Module`. Every figure is from this run; the ratios
divide by the reference's items/s of the same run. Rounds alternate the order of the
profiles, and each point keeps the median of its rounds (the machine is shared).

    .venv/bin/python bench/optimize_bench.py --out bench/results/optimize.json
    .venv/bin/python bench/optimize_bench.py --models mlp --profiles none,int8_dynamic --rounds 1
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_server.devices import cast_module
from model_server.loader import Artifact, load_exported_program, load_module
from model_server.optimization import (
    CompileCache,
    Optimizer,
    check_profile,
    compare_outputs,
    items_per_s,
)
from modelyard.v1 import registry_pb2, tensor_pb2

FP32 = tensor_pb2.DATA_TYPE_FP32
SHARED_BENCH = (
    Path(os.environ["MODELYARD_SHARED_BENCH"])
    if "MODELYARD_SHARED_BENCH" in os.environ
    else Path(__file__).resolve().parents[2] / "shared" / "bench"
)
"""Where ../shared/bench is (its make_models.py builds the reference models)."""

# (label, precision, optimization, artifact format)
POINTS: list[tuple[str, str, str, str]] = [
    ("torchscript", "fp32", "none", "torchscript"),
    ("bf16", "bf16", "none", "torchscript"),
    ("int8_dynamic", "fp32", "int8_dynamic", "torchscript"),
    ("freeze", "fp32", "freeze", "torchscript"),
    ("export", "fp32", "none", "torch_export"),
    ("compile", "fp32", "compile", "torch_export"),
]


class Encoder(nn.Module):
    """A small transformer encoder classifier: [B, 16, 128] -> [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            d_model=128, nhead=4, dim_feedforward=256, batch_first=True, dropout=0.0
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _make_models() -> Any:
    spec = importlib.util.spec_from_file_location("make_models", SHARED_BENCH / "make_models.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {SHARED_BENCH / 'make_models.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name: str) -> tuple[nn.Module, list[int]]:
    """The fp32 eager module and its per-item input shape."""
    if name == "encoder":
        torch.manual_seed(0)
        return Encoder().eval(), [16, 128]
    make_models = _make_models()
    return make_models.build(name), list(make_models.SPECS[name]["input_shape"])


def artifact(name: str, module: nn.Module, item_shape: list[int], fmt: str) -> Artifact:
    """The module saved as `fmt`, as the registry would hand it to a model server."""
    buffer = io.BytesIO()
    if fmt == "torchscript":
        torch.jit.save(torch.jit.script(module), buffer)
        format_value = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        example = torch.randn([2, *item_shape])
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, buffer)
        format_value = registry_pb2.ARTIFACT_FORMAT_TORCH_EXPORT
    data = buffer.getvalue()
    signature = tensor_pb2.Signature(
        inputs=[
            tensor_pb2.TensorSpec(name="x", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, *item_shape])
        ],
        outputs=[tensor_pb2.TensorSpec(name="y", data_type=tensor_pb2.DATA_TYPE_FP32, shape=[-1, 10])],
    )
    return Artifact(
        model=name,
        version=1,
        format=format_value,
        sha256=hashlib.sha256(data).hexdigest(),
        signature=signature,
        data=data,
    )


def prepare(
    art: Artifact, precision: str, profile: str, optimizer: Optimizer
) -> tuple[Callable[..., Any], float, bool]:
    """Load and optimise like the model server does; (forward, load seconds, cache hit)."""
    started = time.perf_counter()
    check_profile(profile, art.platform, "cpu", precision)
    module = load_module(art, "cpu")
    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    module = cast_module(module, dtype)
    module, hit = optimizer.apply(
        module,
        profile=profile,
        platform=art.platform,
        device="cpu",
        sha256=art.sha256,
        exported=lambda: load_exported_program(art.data),
        example_inputs=[torch.zeros([2, *art.signature.inputs[0].shape[1:]])],
        data=art.data,
    )
    load_s = time.perf_counter() - started
    if dtype is None:
        return module, load_s, hit

    def cast_forward(x: torch.Tensor) -> torch.Tensor:
        return module(x.to(dtype)).float()  # type: ignore[no-any-return]

    return cast_forward, load_s, hit


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    cache = CompileCache(Path(args.cache_dir))
    optimizer = Optimizer(cache)
    profiles = set(args.profiles.split(","))
    results: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "budget_s": args.budget_s,
        "models": {},
    }
    for name in args.models.split(","):
        eager, item_shape = build(name)
        generator = torch.Generator().manual_seed(1234)
        sample = torch.randn([args.sample_items, *item_shape], generator=generator)
        with torch.inference_mode():
            reference = eager(sample)
        points: dict[str, Any] = {}
        forwards: dict[str, Callable[..., Any]] = {"eager": eager}
        artifacts = {fmt: artifact(name, eager, item_shape, fmt) for fmt in ("torchscript", "torch_export")}
        for label, precision, profile, fmt in POINTS:
            if label not in profiles and profile not in profiles:
                continue
            try:
                forward, load_s, hit = prepare(artifacts[fmt], precision, profile, optimizer)
            except Exception as exc:  # noqa: BLE001 - a profile that fails is reported, not fatal
                points[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            cached_load_s = None
            if profile == "compile":
                # What a restart pays: the package is on disk now.
                cached_load_s = round(prepare(artifacts[fmt], precision, profile, optimizer)[1], 3)
            with torch.inference_mode():
                out = torch.cat([forward(sample[i : i + 64]) for i in range(0, args.sample_items, 64)])
            max_abs, max_rel, top1 = compare_outputs([reference], [out])
            points[label] = {
                "precision": precision,
                "optimization": profile,
                "format": fmt,
                "load_s": round(load_s, 3),
                "compile_cache_hit": hit,
                "cached_load_s": cached_load_s,
                "max_abs_error": max_abs,
                "max_rel_error": max_rel,
                "top1_agreement": top1,
            }
            forwards[label] = forward
        speeds: dict[str, dict[int, list[float]]] = {k: {1: [], 64: []} for k in forwards}
        for round_index in range(args.rounds):
            order = list(forwards) if round_index % 2 == 0 else list(reversed(forwards))
            for label in order:
                for batch in (1, 64):
                    speeds[label][batch].append(
                        items_per_s(forwards[label], [sample[:batch]], budget_s=args.budget_s)
                    )
        base = {b: statistics.median(speeds["eager"][b]) for b in (1, 64)}
        points["eager"] = {"precision": "fp32", "optimization": "none", "format": "nn.Module"}
        for label in forwards:
            for batch in (1, 64):
                value = statistics.median(speeds[label][batch])
                points[label][f"items_per_s_b{batch}"] = round(value, 1)
                points[label][f"ratio_b{batch}"] = round(value / base[batch], 3)
        results["models"][name] = points
        print(json.dumps({name: points}, indent=1), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="mlp,cnn,encoder")
    parser.add_argument("--profiles", default=",".join(label for label, *_ in POINTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per point per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample-items", type=int, default=512)
    parser.add_argument(
        "--cache-dir", default=os.path.join(tempfile.gettempdir(), "modelyard-optimize-bench")
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for name, points in results["models"].items():
        print(f"\n{name}")
        for label, point in points.items():
            if "error" in point:
                print(f"  {label:13s} refused: {point['error']}")
                continue
            print(
                f"  {label:13s} b1 {point['items_per_s_b1']:>10.0f} ({point['ratio_b1']:.2f}x)  "
                f"b64 {point['items_per_s_b64']:>10.0f} ({point['ratio_b64']:.2f}x)  "
                f"abs {point.get('max_abs_error', 0):.2e}  top1 {point.get('top1_agreement')}"
            )


if __name__ == "__main__":
    sys.exit(main())
