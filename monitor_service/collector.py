"""Scrapes every service's Prometheus /metrics and turns counter deltas into window figures.

Every `scrape_interval_s` the collector lists the services in Redis, fetches each distinct
`metrics_address` and keeps, per *process*, a snapshot of the series it needs (flattened to
`(what, model, version, detail) -> value`). Figures over the rolling window are the deltas
between the newest snapshot of each process and its snapshot at the window's start, summed
over processes: a restarted process (its counters went down) or one that started inside the
window counts from zero. Percentiles come from histogram bucket deltas with the linear
interpolation of Prometheus' `histogram_quantile`, never from averages.

Shadow comparisons (the gateways' `modelyard_gateway_shadow_*`) are filed under the *shadow*
version: its figures say how its answers compared with those of the version that served.
Their window maximum is the largest `..._shadow_abs_diff_max` gauge value (the largest of
its last 30 s) at the window's scrapes, no more than the bound of the highest histogram bucket
that filled in the window (`_shadow_max`).

Processes, not services: several services in one process (as in the tests, or `modelyard up`
in one interpreter) share one metrics registry, so scraping each would count every figure
several times. Scrapes whose `process_start_time_seconds` and host agree are one process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.tls import ClientTLS, https_context
from modelyard.validation import MAX_VERSION

__all__ = [
    "Collector",
    "FeatureStats",
    "ProcessFigures",
    "Routing",
    "ProcessView",
    "Snapshot",
    "VersionStats",
    "histogram_quantile",
    "parse_snapshot",
]

log = logging.getLogger(__name__)

Key = tuple[str, str, int, str]
"""(what, model, version, detail): detail is a status code, a bucket bound or input/feature."""

_PREFIX = "modelyard_model_server_"
# Gauges: their latest value is the figure; everything else is a cumulative counter.
_GAUGES = frozenset({"depth", "rss", "gpu", "gpu_res", "sh_max"})
_GPU_KINDS = {"allocated": "gpu", "reserved": "gpu_res"}
"""`kind` label of modelyard_model_server_device_memory_bytes -> what (detail: the device)."""


def parse_snapshot(text: str) -> dict[Key, float]:
    """The series the monitor uses from one /metrics body, flattened.

    Raises:
        ValueError: the body is not the Prometheus text format.
    """
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, float(sample.value)
            if name == "process_cpu_seconds_total":
                out[("cpu", "", 0, "")] = value
                continue
            if name == "process_resident_memory_bytes":
                out[("rss", "", 0, "")] = value
                continue
            if name == "process_start_time_seconds":
                out[("start", "", 0, "")] = value
                continue
            if name == "modelyard_model_server_device_memory_bytes":
                what = _GPU_KINDS.get(labels.get("kind", ""))
                if what is not None:
                    out[(what, "", 0, labels.get("device", ""))] = value
                continue
            if name == "modelyard_gateway_requests_total" and "model" in labels:
                gw_version = _version(labels.get("version", ""))
                if gw_version is None:  # calls that named no known version ("unknown")
                    continue
                key = ("gw_req", labels["model"], gw_version, labels.get("alias", ""))
                out[key] = out.get(key, 0.0) + value  # summed over status codes
                continue
            shadow = _shadow_series(name, labels)
            if shadow is not None:
                before = out.get(shadow)
                if before is None or math.isnan(before):
                    out[shadow] = value
                elif shadow[0] == "sh_max":  # the largest over the versions that served
                    out[shadow] = before if math.isnan(value) else max(before, value)
                else:  # counts: summed over the versions that served
                    out[shadow] = before + value
                continue
            if not name.startswith(_PREFIX) or "model" not in labels:
                continue
            version = _version(labels.get("version", ""))
            if version is None:
                continue
            model = labels["model"]
            series = _series(name[len(_PREFIX) :], labels)
            if series is not None:
                out[(series[0], model, version, series[1])] = value
    return out


def _version(text: str) -> int | None:
    """A version label as a number, or None for anything that is not a version (a label a
    peer got wrong must never make the monitor's answers fail: they carry int64 versions)."""
    try:
        version = int(text)
    except ValueError:
        return None
    return version if 1 <= version <= MAX_VERSION else None


def _series(short: str, labels: dict[str, str]) -> tuple[str, str] | None:
    match short:
        case "requests_total":
            return "req", labels.get("code", "")
        case "request_seconds_bucket":
            return "lat_b", labels["le"]
        case "queue_seconds_sum":
            return "queue_sum", ""
        case "queue_seconds_count":
            return "queue_n", ""
        case "compute_seconds_sum":
            return "compute_sum", ""
        case "compute_seconds_count":
            return "compute_n", ""
        case "batch_size_bucket":
            return "batch_b", labels["le"]
        case "batch_size_sum":
            return "batch_sum", ""
        case "batch_size_count":
            return "batch_n", ""
        case "queue_depth":
            return "depth", ""
        case "input_sampled_items_total":
            return "in_n", labels.get("input", "")
        case "input_sum":
            return "in_s", f"{labels.get('input', '')}/{labels.get('feature', '')}"
        case "input_sum_squares":
            return "in_q", f"{labels.get('input', '')}/{labels.get('feature', '')}"
        case "input_bin_items_total":
            return "in_b", f"{labels.get('input', '')}/{labels.get('feature', '')}/{labels.get('bin', '')}"
    return None


_SHADOW = {
    "modelyard_gateway_shadow_comparisons_total": "sh_n",
    "modelyard_gateway_shadow_abs_diff_bucket": "sh_b",
    "modelyard_gateway_shadow_abs_diff_max": "sh_max",
}
"""Gateway shadow series -> what (detail: the outcome, or the bucket bound)."""


def _shadow_series(name: str, labels: dict[str, str]) -> Key | None:
    """The key of a gateway shadow sample, under the shadow version; None for other samples."""
    what = _SHADOW.get(name)
    if what is None or "model" not in labels:
        return None
    version = _version(labels.get("shadow_version", ""))
    if version is None:
        return None
    detail = labels.get("outcome", "") if what == "sh_n" else labels.get("le", "")
    return what, labels["model"], version, detail


def _start_time(body: str) -> float:
    """`process_start_time_seconds` from a /metrics body without parsing all of it (0 if none)."""
    at = body.find("\nprocess_start_time_seconds ")
    if at < 0:
        return 0.0
    line = body[at + 1 : body.find("\n", at + 1)]
    try:
        return float(line.split()[1])
    except (IndexError, ValueError):
        return 0.0


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs.

    Linear interpolation inside the bucket holding the rank, as Prometheus does; NaN when
    the histogram is empty; the last finite bound when the rank falls in +Inf.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


@dataclass(frozen=True)
class Routing:
    """A model's routing state as the scrape read it (one atomic read of Redis)."""

    aliases: dict[str, int]
    epoch: int
    """Grows with every change of the model's aliases or deployment."""
    split: dict[str, int]
    """The deployment's traffic split (alias -> weight); empty: none."""


@dataclass(frozen=True)
class Snapshot:
    """One process's series at one moment."""

    time: float
    values: dict[Key, float]


@dataclass
class ProcessView:
    """A scraped process: its services and its snapshots, oldest first."""

    key: tuple[str, float]
    service_ids: set[str] = field(default_factory=set)
    start_time: float = 0.0
    snapshots: deque[Snapshot] = field(default_factory=deque)

    def delta(self, since: float) -> dict[Key, float]:
        """Counter increases from `since` to the newest snapshot; gauges at their newest."""
        newest = self.snapshots[-1]
        base: dict[Key, float] = {}
        if self.start_time < since:
            older = [s for s in self.snapshots if s.time <= since]
            base = (older[-1] if older else self.snapshots[0]).values
        # An input whose sampled-item count went down started again from zero (its version
        # was unloaded and loaded again, and the model server forgot its statistics): its
        # sums count from zero too.
        restarted = {
            (model, version, name)
            for (what, model, version, name), value in newest.values.items()
            if what == "in_n" and value < base.get((what, model, version, name), 0.0)
        }
        out: dict[Key, float] = {}
        for key, value in newest.values.items():
            if key[0] in _GAUGES:
                out[key] = value
                continue
            before = base.get(key, 0.0)
            if key[0] in ("in_s", "in_q"):
                # Gauge-backed sums (input statistics) may go down.
                name = str(key[3]).rpartition("/")[0]
                out[key] = value if (key[1], key[2], name) in restarted else value - before
            else:
                # A counter goes down when its series started again (a restart, which
                # `start_time` also handles, or a version's series forgotten at unload).
                out[key] = value - before if value >= before else value
        return out


@dataclass(frozen=True)
class ProcessFigures:
    """One scraped process's resources."""

    service_ids: list[str]
    cpu_usage: float
    """CPU seconds used per second over the window."""
    resident_memory_bytes: float
    """Resident memory, now."""
    gpu_memory_bytes: float = 0.0
    """GPU memory allocated by tensors, now, summed over the process's CUDA devices."""
    gpu_memory_reserved_bytes: float = 0.0
    """GPU memory held by the caching allocator, now, summed over devices."""


@dataclass
class FeatureStats:
    """Count, mean and variance of one input feature over a window."""

    count: float
    mean: float
    variance: float


@dataclass
class VersionStats:
    """One model version's figures over the window (NaN where there was no data)."""

    model: str
    version: int
    aliases: list[str] = field(default_factory=list)
    request_count: float = 0.0
    requests_per_second: float = 0.0
    requests_by_code: dict[str, float] = field(default_factory=dict)
    error_rate: float = 0.0
    error_count: float = 0.0
    """Requests in the window that did not end OK."""
    latency_histogram: list[tuple[float, float]] = field(default_factory=list)
    """The window's latency histogram: (upper bound in s, cumulative count), ascending."""
    latency_p50_s: float = math.nan
    latency_p95_s: float = math.nan
    latency_p99_s: float = math.nan
    queue_time_mean_s: float = math.nan
    compute_time_mean_s: float = math.nan
    batch_size_mean: float = math.nan
    batch_sizes: list[tuple[float, float]] = field(default_factory=list)
    """(upper bound, batches in that bucket), not cumulative."""
    queue_depth: float = 0.0
    replicas_ready: int = 0
    inputs: dict[str, FeatureStats] = field(default_factory=dict)
    """"input/feature" -> statistics of the sampled items in the window."""
    input_bins: dict[str, list[float]] = field(default_factory=dict)
    """"input/feature" -> sampled items per bin of the registry baseline, in the window (only
    for versions registered with a binned baseline)."""
    input_drift: float = 0.0
    """Filled in by the drift detector: the largest standardised mean shift."""
    input_psi: float = 0.0
    """Filled in by the drift detector: the largest population stability index of a feature."""
    input_drift_p: float = math.nan
    """Filled in by the drift detector: the smallest p-value of its per-feature tests,
    corrected for their number (NaN: no feature had enough items to test)."""
    requests_per_second_by_alias: dict[str, float] = field(default_factory=dict)
    """From the gateways' metrics: calls per second by the alias the caller selected ("" for
    calls that named the version)."""
    shadow_comparisons: float = 0.0
    """Calls mirrored to this version (as a shadow) whose answers were compared."""
    shadow_mismatches: float = 0.0
    """Compared calls whose outputs were not all close (or not of the same names and shapes)."""
    shadow_errors: float = 0.0
    """Mirrored calls that could not be compared (a call failed)."""
    shadow_mismatch_rate: float = 0.0
    """shadow_mismatches / shadow_comparisons; 0 without comparisons."""
    shadow_max_abs_diff: float = math.nan
    """The largest absolute output difference of the window's comparisons; NaN when none."""

    @property
    def shadowed(self) -> bool:
        """Whether the version received mirrored calls in the window."""
        return bool(self.shadow_comparisons or self.shadow_errors)


Fetch = Callable[[str], Awaitable[str]]


def metrics_fetcher(client_tls: ClientTLS | None, token: str | None = None) -> Fetch:
    """GET http://address/metrics, or https:// with the monitor's certificate when the
    cluster's TLS is on (services then serve /metrics over HTTPS); with `token` (the monitor's
    service token), as a bearer token, for services whose /metrics asks for one."""
    context = https_context(client_tls) if client_tls is not None else None
    scheme = "https" if client_tls is not None else "http"
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def fetch(address: str) -> str:
        def get() -> str:
            request = urllib.request.Request(f"{scheme}://{address}/metrics", headers=headers)
            with urllib.request.urlopen(request, timeout=2.0, context=context) as response:
                body: bytes = response.read()
            return body.decode()

        return await asyncio.to_thread(get)

    return fetch


fetch_metrics = metrics_fetcher(None)
"""GET http://address/metrics (loopback or cluster network; short timeout)."""


class Collector:
    """Keeps the window of every process's snapshots and computes the figures.

    Args:
        store: Where services and aliases are read.
        window_s: The rolling window.
        fetch: Fetches a /metrics body by host:port (a strategy, for unit tests).
        clock: Wall clock.
    """

    def __init__(
        self,
        store: CoordinationStore,
        window_s: float,
        *,
        fetch: Fetch = fetch_metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.window_s = window_s
        self._fetch = fetch
        self._clock = clock
        self.processes: dict[tuple[str, float], ProcessView] = {}
        self.services: list[ServiceRecord] = []
        self.aliases: dict[str, dict[str, int]] = {}
        self.routing: dict[str, Routing] = {}
        """Per model, its aliases, routing epoch and traffic split as one consistent read."""
        self.scrapes = 0

    async def scrape(self) -> None:
        """One round: membership, aliases, and every distinct metrics endpoint."""
        aliases, deployments, self.services = await self._store.routing_snapshot()
        self.aliases = {model: pointers for model, (pointers, _epoch) in aliases.items()}
        self.routing = {
            model: Routing(pointers, epoch, dict(deployments[model].traffic_split))
            for model, (pointers, epoch) in aliases.items()
        }
        by_address: dict[str, list[str]] = {}
        for record in self.services:
            if record.metrics_address:
                by_address.setdefault(record.metrics_address, []).append(record.id)
        bodies = await asyncio.gather(
            *(self._fetch(address) for address in by_address), return_exceptions=True
        )
        now = self._clock()
        seen: set[tuple[str, float]] = set()
        for (address, ids), body in zip(by_address.items(), bodies, strict=True):
            if isinstance(body, BaseException):
                log.debug("cannot scrape %s: %s", address, body)
                continue
            start = _start_time(body)
            key = (address.rsplit(":", 1)[0] if start else address, start)
            if key in seen:  # another service of a process already scraped this round
                self.processes[key].service_ids.update(ids)
                continue
            try:
                # Parsing a large body takes milliseconds of CPU: off the event loop.
                values = await asyncio.to_thread(parse_snapshot, body)
            except ValueError as exc:
                log.warning("bad /metrics from %s: %s", address, exc)
                continue
            seen.add(key)
            process = self.processes.get(key)
            if process is None:
                process = self.processes[key] = ProcessView(key, start_time=start or now)
            process.service_ids = set(ids)
            process.snapshots.append(Snapshot(now, values))
            while len(process.snapshots) > 2 and process.snapshots[1].time <= now - self.window_s:
                process.snapshots.popleft()
        for key in list(self.processes):
            if key not in seen and self.processes[key].snapshots[-1].time < now - self.window_s:
                del self.processes[key]
        self.scrapes += 1

    def window(self, window_s: float | None = None) -> dict[Key, float]:
        """Deltas over the window, summed over processes."""
        since = self._clock() - (window_s or self.window_s)
        total: dict[Key, float] = {}
        for process in self.processes.values():
            for key, value in process.delta(since).items():
                total[key] = total.get(key, 0.0) + value
        return total

    def version_stats(self, window_s: float | None = None) -> dict[tuple[str, int], VersionStats]:
        """Figures per model version over the window (or a shorter one)."""
        length = window_s or self.window_s
        series = self.window(length)
        grouped: dict[tuple[str, int], dict[tuple[str, str], float]] = {}
        for (what, model, version, detail), value in series.items():
            if model:
                grouped.setdefault((model, version), {})[(what, detail)] = value
        for record in self.services:
            for held in record.versions:
                grouped.setdefault((held.model, held.version), {})
        for model, aliases in self.aliases.items():
            for version in aliases.values():
                grouped.setdefault((model, version), {})
        stats = {key: _version_stats(key, values, length) for key, values in grouped.items()}
        for record in self.services:
            if record.draining:
                continue
            for held in record.versions:
                if held.state == "ready":
                    stats[(held.model, held.version)].replicas_ready += 1
        for model, aliases in self.aliases.items():
            for alias, version in sorted(aliases.items()):
                stats[(model, version)].aliases.append(alias)
        self._apply_shadow(stats, grouped, length)
        return stats

    def _apply_shadow(
        self,
        stats: dict[tuple[str, int], VersionStats],
        grouped: dict[tuple[str, int], dict[tuple[str, str], float]],
        window_s: float,
    ) -> None:
        """Fill in the shadow figures of the versions that were mirrored to."""
        maxima = self._shadow_max(self._clock() - window_s)
        for key, values in grouped.items():
            by_outcome = {detail: n for (what, detail), n in values.items() if what == "sh_n"}
            figures = stats[key]
            figures.shadow_mismatches = by_outcome.get("mismatch", 0.0)
            figures.shadow_comparisons = by_outcome.get("match", 0.0) + figures.shadow_mismatches
            figures.shadow_errors = by_outcome.get("error", 0.0)
            if figures.shadow_comparisons:
                figures.shadow_mismatch_rate = figures.shadow_mismatches / figures.shadow_comparisons
            buckets = [(float(detail), n) for (what, detail), n in values.items() if what == "sh_b"]
            bound = _highest_filled_bound(buckets)
            if math.isnan(bound):
                continue  # no comparison with a difference in the window
            figures.shadow_max_abs_diff = min(maxima.get(key, bound), bound)

    def _shadow_max(self, since: float) -> dict[tuple[str, int], float]:
        """The largest shadow difference gauge value at the scrapes since `since`, per version,
        over every process."""
        out: dict[tuple[str, int], float] = {}
        for process in self.processes.values():
            for snapshot in process.snapshots:
                if snapshot.time < since and snapshot is not process.snapshots[-1]:
                    continue
                for (what, model, version, _detail), value in snapshot.values.items():
                    if what == "sh_max" and not math.isnan(value):
                        key = (model, version)
                        out[key] = max(out.get(key, value), value)
        return out

    def process_stats(self) -> list[ProcessFigures]:
        """CPU use, resident memory and GPU memory per process."""
        out = []
        since = self._clock() - self.window_s
        for process in self.processes.values():
            newest = process.snapshots[-1]
            base = [s for s in process.snapshots if s.time <= since] or [process.snapshots[0]]
            elapsed = newest.time - base[-1].time
            cpu_key = ("cpu", "", 0, "")
            cpu = (
                (newest.values.get(cpu_key, 0.0) - base[-1].values.get(cpu_key, 0.0)) / elapsed
                if elapsed > 0
                else 0.0
            )
            out.append(
                ProcessFigures(
                    service_ids=sorted(process.service_ids),
                    cpu_usage=cpu,
                    resident_memory_bytes=newest.values.get(("rss", "", 0, ""), 0.0),
                    gpu_memory_bytes=_sum_of(newest.values, "gpu"),
                    gpu_memory_reserved_bytes=_sum_of(newest.values, "gpu_res"),
                )
            )
        return out


def _sum_of(values: dict[Key, float], what: str) -> float:
    """The sum of a process-level series over its details (e.g. GPU memory over devices)."""
    return sum(v for (w, model, _version, _detail), v in values.items() if w == what and not model)


def _version_stats(
    key: tuple[str, int], values: dict[tuple[str, str], float], window_s: float
) -> VersionStats:
    stats = VersionStats(model=key[0], version=key[1])
    by_code = {detail: v for (what, detail), v in values.items() if what == "req" and v > 0}
    stats.requests_by_code = by_code
    stats.request_count = sum(by_code.values())
    stats.requests_per_second = stats.request_count / window_s
    if stats.request_count:
        stats.error_count = stats.request_count - by_code.get("OK", 0.0)
        stats.error_rate = stats.error_count / stats.request_count
    latency = sorted((float(detail), v) for (what, detail), v in values.items() if what == "lat_b")
    stats.latency_histogram = latency
    stats.latency_p50_s = histogram_quantile(0.50, latency)
    stats.latency_p95_s = histogram_quantile(0.95, latency)
    stats.latency_p99_s = histogram_quantile(0.99, latency)
    stats.queue_time_mean_s = _ratio(values.get(("queue_sum", "")), values.get(("queue_n", "")))
    stats.compute_time_mean_s = _ratio(values.get(("compute_sum", "")), values.get(("compute_n", "")))
    stats.batch_size_mean = _ratio(values.get(("batch_sum", "")), values.get(("batch_n", "")))
    cumulative = sorted((float(detail), v) for (what, detail), v in values.items() if what == "batch_b")
    previous = 0.0
    for bound, count in cumulative:
        if count - previous > 0:
            stats.batch_sizes.append((bound, count - previous))
        previous = count
    stats.queue_depth = values.get(("depth", ""), 0.0)
    stats.requests_per_second_by_alias = {
        alias: n / window_s for (what, alias), n in values.items() if what == "gw_req" and n > 0
    }
    for (what, detail), n in values.items():
        if what != "in_n" or n <= 0:
            continue
        prefix = f"{detail}/"
        for (what2, feature), total in values.items():
            if what2 == "in_s" and feature.startswith(prefix):
                squares = values.get(("in_q", feature), 0.0)
                mean = total / n
                stats.inputs[feature] = FeatureStats(n, mean, max(squares / n - mean * mean, 0.0))
    for (what, detail), n in values.items():
        if what == "in_b":
            feature, _, index = detail.rpartition("/")
            try:
                bin_index = int(index)
            except ValueError:
                continue
            counts = stats.input_bins.setdefault(feature, [])
            if len(counts) <= bin_index:
                counts.extend([0.0] * (bin_index + 1 - len(counts)))
            counts[bin_index] = n
    return stats


def _highest_filled_bound(buckets: list[tuple[float, float]]) -> float:
    """The upper bound of the highest bucket that gained observations (cumulative counts in),
    or NaN when none did."""
    previous, highest = 0.0, math.nan
    for bound, count in sorted(buckets):
        if count > previous:
            highest = bound
        previous = max(previous, count)
    return highest


def _ratio(total: float | None, count: float | None) -> float:
    if not count or total is None:
        return math.nan
    return total / count
