"""What a failing batch costs: a model server batch of n requests, clean or holding k requests
the model fails on, timed in one run (in-process `Batcher`, a real TorchScript embedding model).

When a batch's forward raises, the batcher reruns halves of it to find the requests at fault
(at most 2n - 2 extra forwards): the others are answered, and the batch costs more. This
measures how much more, as a ratio against the clean batch of the same size in the same run.

    .venv/bin/python bench/isolation_bench.py --out bench/results/local/isolation.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import torch

from model_server.batching import BatchConfig, Batcher

VOCABULARY = 1000


class Embed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(VOCABULARY, 64)
        self.head = torch.nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids).mean(dim=1))


async def one_batch(batcher: Batcher, requests: list[torch.Tensor]) -> float:
    """Seconds from submitting `requests` together until every one has its answer."""
    start = time.perf_counter()
    await asyncio.gather(*(batcher.submit([x]) for x in requests), return_exceptions=True)
    return time.perf_counter() - start


async def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = torch.jit.script(Embed().eval())
    batcher = Batcher(
        model,
        BatchConfig(max_batch_size=args.batch, max_queue_delay_s=0.05, execution="thread"),
        model_name="bench",
        version=1,
    )
    good = [torch.randint(0, VOCABULARY, (1, 32)) for _ in range(args.batch)]
    results = []
    for bad in (0, 1, 4):
        requests = list(good)
        for i in range(bad):
            requests[(i * 17 + 5) % args.batch] = torch.full((1, 32), VOCABULARY + 7)
        for _ in range(3):  # warm
            await one_batch(batcher, requests)
        times = [await one_batch(batcher, requests) for _ in range(args.repeats)]
        results.append({"batch": args.batch, "bad": bad, "median_ms": statistics.median(times) * 1000})
    await batcher.aclose()
    clean = results[0]["median_ms"]
    for row in results:
        row["ratio_to_clean"] = row["median_ms"] / clean
        ms, ratio = row["median_ms"], row["ratio_to_clean"]
        print(f"batch {row['batch']}, {row['bad']} failing: {ms:.2f} ms ({ratio:.2f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results/local/isolation.json"))
    asyncio.run(main(parser.parse_args()))
