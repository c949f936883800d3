"""Reduced precision per deployment: speed and accuracy against fp32, on the reference models.

For each reference model (../shared/bench/make_models.py, scripted *unfrozen*: a frozen
module keeps its weights as constants that cannot be cast) and each precision this machine
can run (CPU: fp32, bf16; CUDA where present: fp32, fp16, bf16), it builds the forward
function exactly as the model server does (`model_server.devices.cast_module` +
`forward_fn`), then measures items/s at batch 64 and the max absolute error of the outputs
against fp32 on a fixed input.

    .venv/bin/python bench/model_server_precision.py [--seconds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from model_server.devices import cast_module, check_precision, forward_fn, resolve_device

MAKE_MODELS = Path(__file__).resolve().parent.parent.parent / "shared" / "bench" / "make_models.py"


def _make_models() -> Any:
    spec = importlib.util.spec_from_file_location("make_models", MAKE_MODELS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(fn: Any, x: torch.Tensor, seconds: float, device: str) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        runs, stop_at = 0, time.perf_counter() + seconds
        while time.perf_counter() < stop_at:
            fn(x)
            runs += 1
        if device != "cpu":
            torch.cuda.synchronize()
    return runs * x.shape[0] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mm = _make_models()
    devices = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
    rows = []
    for name in ("mlp", "cnn"):
        base = torch.jit.script(mm.build(name).eval())
        x = mm.fixed_input(name, args.batch)
        with torch.inference_mode():
            reference = base(x)
        for device in devices:
            resolved = resolve_device(device)
            fp32_speed = None
            for precision in ("fp32", "fp16", "bf16"):
                try:
                    dtype = check_precision(precision, resolved)
                except Exception:  # noqa: BLE001 - not runnable here (fp16 on CPU)
                    continue
                module = cast_module(copy.deepcopy(base).to(resolved), dtype)
                fn = forward_fn(module, resolved, dtype, [torch.float32])
                with torch.inference_mode():
                    out = fn(x)
                error = float((out.float().cpu() - reference).abs().max())
                speed = measure(fn, x, args.seconds, resolved)
                fp32_speed = fp32_speed or speed
                row = {
                    "model": name,
                    "device": resolved,
                    "precision": precision,
                    "batch": args.batch,
                    "items_per_s": round(speed, 1),
                    "speedup_vs_fp32": round(speed / fp32_speed, 3),
                    "max_abs_error_vs_fp32": error,
                    "reference_max_abs": float(reference.abs().max()),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| model | device | precision | items/s (batch {args.batch}) | vs fp32 | max abs error |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} | {r['precision']} | {r['items_per_s']:.0f} | "
            f"{r['speedup_vs_fp32']:.2f}x | {r['max_abs_error_vs_fp32']:.2e} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
