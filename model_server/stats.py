"""Per-version request figures and input statistics that the monitor scrapes from /metrics.

This module is the model server's side of the monitor contract (docs/monitoring.md):

- `modelyard_model_server_requests_total{model,version,code}`: Infer calls by status code.
- `modelyard_model_server_request_seconds{model,version}`: Infer latency as the model server
  sees it (validation, queue and compute), with buckets about 12 % apart so that percentiles
  interpolated from bucket deltas stay within a few per cent of the true ones.
- Input statistics of one request in `input_sample_every` (counted, not random: cheap and
  deterministic): per input and per feature (column of the input flattened to
  `[items, features]`, the first `MAX_FEATURES` only) the count of items, the sum and the sum
  of squares, summed in numpy arrays and turned into series only when /metrics is read
  (`InputMoments`). The monitor turns window deltas of these into a mean and a variance per
  feature and compares them with the model's baseline.
- For versions registered with an input baseline that has bins (`modelyard.baseline`), the
  sampled items per bin of every feature:
  `modelyard_model_server_input_bin_items_total{model,version,input,feature,bin}`, from which
  the monitor computes the population stability index. The edges are learnt when the version
  is loaded (`register_input_bins`, from the registry's `ModelVersion.input_baselines`); the
  counting is one `searchsorted` and one `bincount` on the sampled tensor, and the counters
  are read only when /metrics is scraped.
- The process's GPU memory, read only when /metrics is scraped:
  `modelyard_model_server_device_memory_bytes{device="cuda:N",kind="allocated"|"reserved"}`
  for every visible CUDA device (no series on a machine without CUDA).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import numpy as np
import torch
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelyard.baseline import MAX_FEATURES as _BASELINE_FEATURES
from modelyard.errors import ModelyardError
from modelyard.rpc.errors import status_code_for
from modelyard.telemetry import FINE_LATENCY_BUCKETS_S
from modelyard.tensor_codec import DTYPE_BY_DATA_TYPE
from modelyard.v1 import registry_pb2, tensor_pb2
from modelyard.validation import WireTensor

__all__ = [
    "REQUESTS",
    "REQUEST_SECONDS",
    "REQUEST_BUCKETS_S",
    "INPUT_BINS",
    "INPUT_MOMENTS",
    "DEVICE_MEMORY",
    "MAX_FEATURES",
    "CudaMemory",
    "DeviceMemory",
    "InputBinCounts",
    "InputMoments",
    "RequestStats",
    "read_device_memory",
    "register_input_bins",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

REQUEST_BUCKETS_S = FINE_LATENCY_BUCKETS_S

MAX_FEATURES = _BASELINE_FEATURES
"""Columns per input whose statistics are exported (bounds the series count); the same as the
baselines the registry records."""

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


class _Bins:
    """One input's bin edges (padded with +inf to a [features, edges] array) and counts."""

    __slots__ = ("edges", "bins", "counts")

    def __init__(self, baseline: registry_pb2.InputBaseline) -> None:
        features = baseline.features[:MAX_FEATURES]
        width = max(len(f.bin_edges) for f in features)
        edges = np.full((len(features), width), np.inf)
        for i, feature in enumerate(features):
            edges[i, : len(feature.bin_edges)] = list(feature.bin_edges)
        self.edges = edges
        # Bins per feature; 0 for a feature without edges (its counts are never exported).
        # Padding with +inf puts values above a feature's last real edge in its last real bin.
        self.bins = [len(f.bin_edges) + 1 if f.bin_edges else 0 for f in features]
        self.counts = np.zeros(len(features) * (width + 1))


class InputBinCounts(Collector):
    """Counts sampled items per baseline bin, and exports the counts when /metrics is read.

    A Prometheus custom collector: nothing is exported per sample, so the cost on the request
    path is one vectorised comparison against the edges and one `bincount` per sampled input.
    """

    def __init__(self, max_versions: int = 10_000) -> None:
        self._lock = threading.Lock()  # the sampler runs on the event loop, collect() in the HTTP thread
        self._bins: dict[tuple[str, str, str], _Bins] = {}
        self._max_versions = max_versions

    def register(self, model: str, version: int, baselines: Sequence[registry_pb2.InputBaseline]) -> None:
        """Learn a version's bin edges (idempotent: a version's baseline never changes)."""
        for baseline in baselines:
            key = (model, str(version), baseline.input)
            if key in self._bins or not any(f.bin_edges for f in baseline.features):
                continue
            with self._lock:
                if len(self._bins) >= self._max_versions:  # unbounded model names must not leak
                    self._bins.clear()
                self._bins[key] = _Bins(baseline)

    def clear(self) -> None:
        """Forget every version's edges and counts."""
        with self._lock:
            self._bins.clear()

    def forget(self, model: str, version: str) -> None:
        """Forget one version's edges and counts (its series leave /metrics)."""
        with self._lock:
            for key in [k for k in self._bins if k[:2] == (model, version)]:
                del self._bins[key]

    def count(self, labels: tuple[str, str], name: str, rows: np.ndarray) -> None:
        """Add the items of `rows` ([items, features], float64) to the bins of one input."""
        bins = self._bins.get((labels[0], labels[1], name))
        if bins is None:
            return
        features = min(rows.shape[1], bins.edges.shape[0])
        width = bins.edges.shape[1] + 1
        # A value's bin is the number of edges below it (searchsorted, side="left"), for every
        # feature at once; +inf padding is never below a value.
        index = (bins.edges[None, :features, :] < rows[:, :features, None]).sum(axis=2)
        index += np.arange(features) * width
        added = np.bincount(index.ravel(), minlength=features * width)
        with self._lock:
            bins.counts[: features * width] += added

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "modelyard_model_server_input_bin_items",
            "Sampled items per bin of the version's input baseline, by input and feature.",
            labels=["model", "version", "input", "feature", "bin"],
        )
        with self._lock:
            snapshot = [
                (key, b.bins, b.edges.shape[1] + 1, b.counts.tolist()) for key, b in self._bins.items()
            ]
        for (model, version, name), per_feature, width, counts in snapshot:
            for feature, bins in enumerate(per_feature):
                for index in range(bins):
                    family.add_metric(
                        [model, version, name, str(feature), str(index)], counts[feature * width + index]
                    )
        yield family


INPUT_BINS = InputBinCounts()
REGISTRY.register(INPUT_BINS)


class _Moments:
    """One input's sampled item count and per-feature sums and sums of squares."""

    __slots__ = ("items", "sums", "squares")

    def __init__(self, features: int) -> None:
        self.items = 0
        self.sums = np.zeros(features)
        self.squares = np.zeros(features)

    def add(self, items: int, sums: np.ndarray, squares: np.ndarray) -> None:
        features = sums.shape[0]
        if features > self.sums.shape[0]:  # a wider sample of a dynamic shape: keep what was summed
            self.sums = np.pad(self.sums, (0, features - self.sums.shape[0]))
            self.squares = np.pad(self.squares, (0, features - self.squares.shape[0]))
        self.items += items
        self.sums[:features] += sums
        self.squares[:features] += squares


class InputMoments(Collector):
    """Sampled items, and per feature the sum and the sum of squares, per model version and
    input: accumulated as float64 numpy arrays on the request path (two vector sums), exported
    as series only when /metrics is read.

    - `modelyard_model_server_input_sampled_items_total{model,version,input}` (counter)
    - `modelyard_model_server_input_sum{model,version,input,feature}` and
      `modelyard_model_server_input_sum_squares{...}`: gauges, not counters, because sums of
      real values can go down; the monitor only uses their deltas.

    One `labels()` call per feature and sample, as Prometheus children would need, cost about
    0.3 ms for 32 features: more than a batch-1 forward.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        self._lock = threading.Lock()  # the sampler runs on the event loop, collect() in the HTTP thread
        self._moments: dict[tuple[str, str, str], _Moments] = {}
        self._max_keys = max_keys

    def clear(self) -> None:
        """Forget every version's moments."""
        with self._lock:
            self._moments.clear()

    def forget(self, model: str, version: str) -> None:
        """Forget one version's moments (its series leave /metrics)."""
        with self._lock:
            for key in [k for k in self._moments if k[:2] == (model, version)]:
                del self._moments[key]

    def add(self, labels: tuple[str, str], name: str, rows: np.ndarray) -> None:
        """Add sampled `rows` ([items, features], float64) of input `name`."""
        sums = rows.sum(axis=0)
        squares = np.einsum("ij,ij->j", rows, rows)
        features = sums.shape[0]
        key = (labels[0], labels[1], name)
        with self._lock:
            moments = self._moments.get(key)
            if moments is None:
                if len(self._moments) >= self._max_keys:
                    self._moments.clear()  # unbounded model names must not leak memory
                moments = self._moments[key] = _Moments(features)
            moments.add(rows.shape[0], sums, squares)

    def collect(self) -> Iterator[Metric]:
        items = CounterMetricFamily(
            "modelyard_model_server_input_sampled_items",
            "Items (rows on dim 0) of the sampled requests, by model version and input.",
            labels=["model", "version", "input"],
        )
        sums = GaugeMetricFamily(
            "modelyard_model_server_input_sum",
            "Sum of one input feature over the sampled items.",
            labels=["model", "version", "input", "feature"],
        )
        squares = GaugeMetricFamily(
            "modelyard_model_server_input_sum_squares",
            "Sum of squares of one input feature over the sampled items.",
            labels=["model", "version", "input", "feature"],
        )
        with self._lock:
            snapshot = [
                (key, m.items, m.sums.tolist(), m.squares.tolist()) for key, m in self._moments.items()
            ]
        for (model, version, name), count, feature_sums, feature_squares in snapshot:
            items.add_metric([model, version, name], count)
            for feature, (total, total_squares) in enumerate(zip(feature_sums, feature_squares, strict=True)):
                sums.add_metric([model, version, name, str(feature)], total)
                squares.add_metric([model, version, name, str(feature)], total_squares)
        yield items
        yield sums
        yield squares


INPUT_MOMENTS = InputMoments()
REGISTRY.register(INPUT_MOMENTS)


def register_input_bins(model: str, version: int, baselines: Sequence[registry_pb2.InputBaseline]) -> None:
    """Learn the bin edges of a version being loaded, so its sampled inputs are also counted
    per bin (the monitor's population stability index). A no-op without binned baselines."""
    INPUT_BINS.register(model, version, baselines)


class CudaMemory(Protocol):
    """The part of `torch.cuda` that `read_device_memory` uses (a seam for unit tests)."""

    def is_available(self) -> bool: ...

    def device_count(self) -> int: ...

    def memory_allocated(self, device: int) -> int: ...

    def memory_reserved(self, device: int) -> int: ...


def read_device_memory(cuda: CudaMemory) -> list[tuple[str, int, int]]:
    """(device, allocated bytes, reserved bytes) for every visible CUDA device.

    Empty when CUDA is not available. None of these calls initialises CUDA: `is_available` and
    `device_count` only ask the driver, and the memory figures are 0 in a process that has not
    used its GPUs yet.

    Args:
        cuda: `torch.cuda`, or a stand-in with the same four functions.

    Returns:
        One `("cuda:N", allocated, reserved)` per device, in device order. Allocated is the
        memory held by tensors; reserved is what the caching allocator holds from the driver
        (allocated plus its cache), the figure closer to what `nvidia-smi` shows.
    """
    if not cuda.is_available():
        return []
    return [
        (f"cuda:{index}", int(cuda.memory_allocated(index)), int(cuda.memory_reserved(index)))
        for index in range(cuda.device_count())
    ]


class DeviceMemory(Collector):
    """Exports the process's GPU memory per device, read when /metrics is scraped.

    Args:
        cuda: Where the figures come from; `torch.cuda` unless a test passes a stand-in.
    """

    NAME = "modelyard_model_server_device_memory_bytes"

    def __init__(self, cuda: CudaMemory | None = None) -> None:
        self._cuda: CudaMemory = torch.cuda if cuda is None else cuda

    def describe(self) -> Iterator[Metric]:
        # Registering calls describe() instead of collect(): no CUDA query at import time.
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        try:
            devices = read_device_memory(self._cuda)
        except Exception:  # a broken driver must not break the whole /metrics page
            log.exception("reading GPU memory failed")
            devices = []
        for device, allocated, reserved in devices:
            family.add_metric([device, "allocated"], allocated)
            family.add_metric([device, "reserved"], reserved)
        # The family is always yielded (without samples on a CPU-only machine) so that its
        # HELP and TYPE lines document it.
        yield family

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            self.NAME,
            "GPU memory of this process per CUDA device: allocated by tensors, or reserved by "
            "the caching allocator.",
            labels=["device", "kind"],
        )


DEVICE_MEMORY = DeviceMemory()
REGISTRY.register(DEVICE_MEMORY)


SampledInput = tensor_pb2.Tensor | WireTensor | tuple[str, torch.Tensor]
"""An input as the statistics take it: on the wire (decoded only when sampled) or decoded."""

_SAMPLED_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.int32, torch.int64})
# The wire dtypes that are sampled, as numpy dtypes (derived from the codec's table).
_NUMPY_BY_DATA_TYPE: dict[int, np.dtype[Any]] = {
    data_type: torch.empty(0, dtype=dtype).numpy().dtype
    for data_type, dtype in DTYPE_BY_DATA_TYPE.items()
    if dtype in _SAMPLED_DTYPES
}


def _sampled_array(item: SampledInput) -> tuple[str, np.ndarray] | None:
    """An input as (name, numpy array) for the statistics, or None when it has none (other
    dtypes, bfloat16, a malformed wire tensor).

    numpy, not torch: torch's Python bindings release the GIL in every op, and on the event
    loop each release lets a worker thread running a forward keep the GIL for up to the 5 ms
    switch interval; numpy keeps it for arrays this small.
    """
    if isinstance(item, tuple) and not isinstance(item, WireTensor):
        name, tensor = item
        if tensor.dtype not in _SAMPLED_DTYPES or tensor.requires_grad or tensor.device.type != "cpu":
            return None
        return name, tensor.numpy()
    dtype = _NUMPY_BY_DATA_TYPE.get(item.data_type)
    shape = tuple(item.shape)
    if dtype is None or any(d < 0 for d in shape):
        return None
    array = np.frombuffer(item.raw, dtype=dtype)
    if array.size != math.prod(shape):
        return None
    return item.name, array.reshape(shape)


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
        self,
        model: str,
        version: int,
        inputs: Sequence[SampledInput],
        call: Callable[[], Awaitable[T]],
    ) -> T:
        """Run `call` (the Infer work) and record its outcome under the model version.

        Args:
            inputs: The request's inputs, for the input statistics: wire tensors (decoded
                only when sampled, with numpy), or (name, tensor) pairs already decoded.
        """
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

    def forget(self, model: str, version: int) -> None:
        """Drop a version's series once it is unloaded, so that a long-lived model server
        exports only what it serves (Prometheus marks the vanished series stale). A call that
        finishes on the version after this starts its series again."""
        self._seconds.pop((model, version), None)
        for key in [k for k in self._counts if k[:2] == (model, version)]:
            del self._counts[key]
        labels = {"model": model, "version": str(version)}
        REQUESTS.remove_by_labels(labels)
        REQUEST_SECONDS.remove_by_labels(labels)
        INPUT_BINS.forget(model, str(version))
        INPUT_MOMENTS.forget(model, str(version))

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

    def _sample(self, labels: tuple[str, str], inputs: Sequence[SampledInput]) -> None:
        for item in inputs:
            sampled = _sampled_array(item)
            if sampled is None:
                continue
            name, array = sampled
            if array.ndim == 0 or array.shape[0] == 0:
                continue
            rows = array.reshape(array.shape[0], -1)[:, :MAX_FEATURES].astype(np.float64)
            if rows.shape[1] == 0:
                continue
            INPUT_BINS.count(labels, name, rows)
            INPUT_MOMENTS.add(labels, name, rows)
