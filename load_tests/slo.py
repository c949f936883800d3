"""Service level objectives per scenario (`slo.yaml`), locust's final statistics, and the
check of one against the other."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Slo", "RunStats", "SloMiss", "load_slos", "read_stats", "check_slo", "DEFAULT_SLO_FILE"]

DEFAULT_SLO_FILE = Path(__file__).with_name("slo.yaml")


@dataclass(frozen=True)
class Slo:
    """What a scenario must achieve; a field left unset is not checked."""

    p99_ms: float | None = None
    """The 99th percentile latency of every request, in milliseconds, must be at most this."""
    max_error_rate: float | None = None
    """Failed requests over all requests must be at most this fraction (0 means none)."""
    min_rps: float | None = None
    """Requests per second over the run must be at least this."""
    min_requests: int = 1
    """A run with fewer requests than this fails: no traffic is not a pass."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str) -> Slo:
        unknown = set(data) - {"p99_ms", "max_error_rate", "min_rps", "min_requests"}
        if unknown:
            raise ValueError(f"{where}: unknown SLO field(s) {sorted(unknown)}")
        slo = cls(**data)
        for name in ("p99_ms", "max_error_rate", "min_rps"):
            value = getattr(slo, name)
            if value is not None and (not isinstance(value, int | float) or value < 0):
                raise ValueError(f"{where}.{name}: must be a number >= 0, got {value!r}")
        return slo


@dataclass(frozen=True)
class RunStats:
    """Every request of a run, aggregated over the request names (there is one per scenario)."""

    requests: int
    failures: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class SloMiss:
    """One objective missed: `slo` names it (e.g. `p99_ms`), `message` says by how much."""

    slo: str
    message: str


def load_slos(path: Path = DEFAULT_SLO_FILE) -> dict[str, Slo]:
    """Read `{scenario: {p99_ms, max_error_rate, min_rps, min_requests}}` from a YAML file.

    Raises:
        ValueError: the file is not a mapping of scenarios to SLO mappings.
    """
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of scenario names to SLOs")
    slos = {}
    for scenario, fields in data.items():
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: {scenario}: expected a mapping of SLO fields")
        slos[str(scenario)] = Slo.from_dict(fields, where=f"{path.name}: {scenario}")
    return slos


def _percentile(response_times: dict[float, int], requests: int, fraction: float) -> float:
    # Locust's own method (stats.calculate_response_time_percentile), on its rounded buckets.
    within = int(requests * fraction)
    counted = 0
    for response_time in sorted(response_times, reverse=True):
        counted += response_times[response_time]
        if requests - counted <= within:
            return response_time
    return math.nan


def read_stats(stats_json: Path) -> RunStats:
    """Aggregate locust's final statistics (`--json-file`): every request of the run.

    Locust's periodic CSV can miss the calls that finish while the users stop; the JSON
    file is written after they have.

    Raises:
        ValueError: the file is not locust's statistics list.
    """
    entries = json.loads(stats_json.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{stats_json}: not a locust statistics list")
    response_times: dict[float, int] = {}
    requests = failures = 0
    start = math.inf
    last = -math.inf
    max_ms = 0.0
    for entry in entries:
        requests += entry["num_requests"]
        failures += entry["num_failures"]
        max_ms = max(max_ms, entry["max_response_time"] or 0.0)
        if entry["num_requests"]:
            start = min(start, entry["start_time"])
            last = max(last, entry["last_request_timestamp"])
        for bucket, count in entry["response_times"].items():
            response_times[float(bucket)] = response_times.get(float(bucket), 0) + count
    span_s = last - start if requests else 0.0
    return RunStats(
        requests=requests,
        failures=failures,
        rps=requests / span_s if span_s > 0 else 0.0,
        p50_ms=_percentile(response_times, requests, 0.5),
        p99_ms=_percentile(response_times, requests, 0.99),
        max_ms=max_ms,
    )


def check_slo(slo: Slo, stats: RunStats) -> list[SloMiss]:
    """Every objective of `slo` that `stats` misses; empty when the run passes."""
    misses = []
    if stats.requests < slo.min_requests:
        misses.append(
            SloMiss(
                "min_requests", f"SLO min_requests missed: {stats.requests} requests < {slo.min_requests}"
            )
        )
    if slo.p99_ms is not None and not stats.p99_ms <= slo.p99_ms:
        misses.append(
            SloMiss("p99_ms", f"SLO p99_ms missed: p99 latency {stats.p99_ms:g} ms > {slo.p99_ms:g} ms")
        )
    if slo.max_error_rate is not None and stats.error_rate > slo.max_error_rate:
        misses.append(
            SloMiss(
                "max_error_rate",
                f"SLO max_error_rate missed: {stats.failures} of {stats.requests} requests failed "
                f"({stats.error_rate:.4%} > {slo.max_error_rate:.4%})",
            )
        )
    if slo.min_rps is not None and not stats.rps >= slo.min_rps:
        misses.append(SloMiss("min_rps", f"SLO min_rps missed: {stats.rps:.1f} requests/s < {slo.min_rps:g}"))
    return misses
