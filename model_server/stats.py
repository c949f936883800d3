"""Per-version request figures and input statistics that the monitor scrapes from /metrics.

This module is the model server's side of the monitor contract (docs/monitoring.md):

- `modelyard_model_server_requests_total{model,version,code}`: Infer calls by status code.
- `modelyard_model_server_request_seconds{model,version}`: Infer latency as the model server
  sees it (validation, queue and compute), with buckets about 12 % apart so that percentiles
  interpolated from bucket deltas stay within a few per cent of the true ones.
- Input statistics of one request in `input_sample_every` (counted, not random: cheap and
  deterministic): per input and per feature (column of the input flattened to
  `[items, features]`, the first `MAX_FEATURES` only) the count of items, the sum and the sum
  of squares. The monitor turns window deltas of these into a mean and a variance per feature
  and compares them with the model's baseline.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
import torch
from prometheus_client import Counter, Gauge, Histogram

from modelyard.errors import ModelyardError
from modelyard.rpc.errors import status_code_for
from modelyard.telemetry import FINE_LATENCY_BUCKETS_S
from modelyard.tensor_codec import tensor_from_proto
from modelyard.v1 import tensor_pb2

__all__ = [
    "REQUESTS",
    "REQUEST_SECONDS",
    "REQUEST_BUCKETS_S",
    "INPUT_ITEMS",
    "INPUT_SUM",
    "INPUT_SQUARES",
    "MAX_FEATURES",
    "RequestStats",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_BUCKETS_S = FINE_LATENCY_BUCKETS_S

MAX_FEATURES = 32
"""Columns per input whose statistics are exported (bounds the series count)."""

REQUESTS = Counter(
    "modelyard_model_server_requests",
    "Infer calls completed by the model server, by model version and status code.",
    ["model", "version", "code"],
)
REQUEST_SECONDS = Histogram(
    "modelyard_model_server_request_seconds",
    "Infer latency on the model server (validation, queue, compute), by model version.",
    ["model", "version"],
    buckets=REQUEST_BUCKETS_S,
)
INPUT_ITEMS = Counter(
    "modelyard_model_server_input_sampled_items",
    "Items (rows on dim 0) of the sampled requests, by model version and input.",
    ["model", "version", "input"],
)
# Gauges, not counters: sums of real values can go down. The monitor only uses their deltas.
INPUT_SUM = Gauge(
    "modelyard_model_server_input_sum",
    "Sum of one input feature over the sampled items.",
    ["model", "version", "input", "feature"],
)
INPUT_SQUARES = Gauge(
    "modelyard_model_server_input_sum_squares",
    "Sum of squares of one input feature over the sampled items.",
    ["model", "version", "input", "feature"],
)


class RequestStats:
    """Wraps each Infer call: counts it by status, times it, and samples its inputs.

    Args:
        input_sample_every: Record the input statistics of one request in this many; 0 turns
            input statistics off. Default from MODELYARD_MODEL_SERVER_INPUT_SAMPLE_EVERY (10).
    """

    def __init__(self, input_sample_every: int | None = None) -> None:
        if input_sample_every is None:
            input_sample_every = int(os.environ.get("MODELYARD_MODEL_SERVER_INPUT_SAMPLE_EVERY", "10"))
        self._every = input_sample_every
        self._seen = 0
        # Bound label children, cached: `labels()` costs more than the observation itself.
        self._seconds: dict[tuple[str, int], Any] = {}
        self._counts: dict[tuple[str, int, str], Any] = {}

    async def observe(
        self, model: str, version: int, inputs: Sequence[tensor_pb2.Tensor], call: Callable[[], Awaitable[T]]
    ) -> T:
        """Run `call` (the Infer work) and record its outcome under the model version."""
        start = time.perf_counter()
        code = "OK"
        try:
            result = await call()
        except ModelyardError as exc:
            code = status_code_for(exc).name
            raise
        except BaseException:
            code = grpc.StatusCode.INTERNAL.name
            raise
        finally:
            self._record(model, version, code, time.perf_counter() - start)
        if self._every:
            self._seen += 1
            if self._seen >= self._every:
                self._seen = 0
                try:
                    self._sample((model, str(version)), inputs)
                except Exception:  # statistics must never fail a request that succeeded
                    log.exception("input statistics of %s v%d failed", model, version)
        return result

    def _record(self, model: str, version: int, code: str, seconds: float) -> None:
        histogram = self._seconds.get((model, version))
        if histogram is None:
            if len(self._seconds) > 10_000:  # unbounded model names must not leak memory
                self._seconds.clear()
                self._counts.clear()
            histogram = self._seconds[(model, version)] = REQUEST_SECONDS.labels(model, str(version))
        histogram.observe(seconds)
        counter = self._counts.get((model, version, code))
        if counter is None:
            counter = self._counts[(model, version, code)] = REQUESTS.labels(model, str(version), code)
        counter.inc()

    def _sample(self, labels: tuple[str, str], inputs: Sequence[tensor_pb2.Tensor]) -> None:
        for message in inputs:
            try:
                tensor = tensor_from_proto(message)
            except ModelyardError:
                continue
            if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64)):
                continue
            if tensor.dim() == 0 or tensor.shape[0] == 0:
                continue
            rows = tensor.reshape(tensor.shape[0], -1)[:, :MAX_FEATURES].to(torch.float64)
            if rows.shape[1] == 0:
                continue
            sums = rows.sum(dim=0).tolist()
            squares = (rows * rows).sum(dim=0).tolist()
            INPUT_ITEMS.labels(*labels, message.name).inc(rows.shape[0])
            for feature, (s, q) in enumerate(zip(sums, squares, strict=True)):
                INPUT_SUM.labels(*labels, message.name, str(feature)).inc(s)
                INPUT_SQUARES.labels(*labels, message.name, str(feature)).inc(q)
