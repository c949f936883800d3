"""The size of shadow mismatches: every comparison's largest difference goes to a histogram,
and a gauge holds the largest of the recent past (what the monitor reads as the maximum)."""

from __future__ import annotations

import math

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest

from gateway import dataplane
from gateway.metrics import ShadowDiffs
from gateway.shadow import ShadowRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_gauge_holds_the_largest_difference_of_its_window() -> None:
    registry = CollectorRegistry()
    gauge = Gauge("diff_max", "test", ["model", "version", "shadow_version"], registry=registry)
    clock = Clock()
    diffs = ShadowDiffs(gauge, window_s=30.0, clock=clock)
    assert math.isnan(diffs.max("m", "1", "2"))

    diffs.observe("m", "1", "2", 0.5)
    clock.now += 0.4
    diffs.observe("m", "1", "2", 0.25)  # same second: folded into its maximum
    diffs.observe("m", "1", "2", math.nan)  # ignored
    clock.now += 10.0
    diffs.observe("m", "1", "2", 0.125)
    assert diffs.max("m", "1", "2") == 0.5
    assert registry.get_sample_value("diff_max", {"model": "m", "version": "1", "shadow_version": "2"}) == 0.5

    clock.now += 25.0  # 0.5 is older than 30 s now, 0.125 is not
    assert diffs.max("m", "1", "2") == 0.125
    clock.now += 30.0
    assert math.isnan(diffs.max("m", "1", "2"))
    assert b'diff_max{model="m",shadow_version="2",version="1"} NaN' in generate_latest(registry)


def test_a_comparison_is_counted_and_its_size_observed() -> None:
    labels = {"model": "sized", "version": "1", "shadow_version": "2"}

    def sample(name: str, **extra: str) -> float | None:
        return REGISTRY.get_sample_value(name, {**labels, **extra})

    dataplane._count_shadow(ShadowRecord(0.0, "r1", "sized", 1, 2, "mismatch", 0.03))
    dataplane._count_shadow(ShadowRecord(0.0, "r2", "sized", 1, 2, "match", 2e-6))
    dataplane._count_shadow(ShadowRecord(0.0, "r3", "sized", 1, 2, "error"))
    assert sample("modelyard_gateway_shadow_comparisons_total", outcome="mismatch") == 1
    assert sample("modelyard_gateway_shadow_comparisons_total", outcome="error") == 1
    assert sample("modelyard_gateway_shadow_abs_diff_count") == 2  # the error has no size
    assert sample("modelyard_gateway_shadow_abs_diff_bucket", le="1e-05") == 1
    assert sample("modelyard_gateway_shadow_abs_diff_bucket", le="0.1") == 2
    assert sample("modelyard_gateway_shadow_abs_diff_max") == 0.03
