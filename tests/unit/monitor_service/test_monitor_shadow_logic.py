"""Shadow comparisons in the monitor: the gateways' series filed under the shadow version,
the window's mismatch rate and largest difference, GetModelStats' ShadowStats, and the
`shadow` events on a change of state only."""

from __future__ import annotations

import math

import pytest

from modelyard.coordination import CoordinationStore, ServiceRecord
from monitor_service.collector import Collector, VersionStats, parse_snapshot
from monitor_service.events import summarize
from monitor_service.servicer import _version_stats
from monitor_service.shadow import ShadowWatch

BUCKETS = (
    "1e-07",
    "1e-06",
    "1e-05",
    "0.0001",
    "0.001",
    "0.01",
    "0.1",
    "1.0",
    "10.0",
    "100.0",
    "1000.0",
    "+Inf",
)


def gateway_body(
    *, start: float, matches: int, mismatches: int, errors: int, diffs: list[float], recent_max: float
) -> str:
    """A gateway's /metrics with the shadow series of tiny v1 (served) mirrored to v2."""
    labels = 'model="tiny",shadow_version="2",version="1"'
    lines = [
        "# TYPE process_start_time_seconds gauge",
        f"process_start_time_seconds {start}",
        "# TYPE modelyard_gateway_shadow_comparisons counter",
        f'modelyard_gateway_shadow_comparisons_total{{{labels},outcome="match"}} {matches}',
        f'modelyard_gateway_shadow_comparisons_total{{{labels},outcome="mismatch"}} {mismatches}',
        f'modelyard_gateway_shadow_comparisons_total{{{labels},outcome="error"}} {errors}',
        # Mirrored from another served version: summed in, under the same shadow version.
        'modelyard_gateway_shadow_comparisons_total{model="tiny",shadow_version="2",version="3",'
        'outcome="match"} 1',
        "# TYPE modelyard_gateway_shadow_abs_diff histogram",
    ]
    for bound in BUCKETS:
        count = sum(d <= float(bound) for d in diffs)
        lines.append(f'modelyard_gateway_shadow_abs_diff_bucket{{{labels},le="{bound}"}} {count}')
    lines += [
        f"modelyard_gateway_shadow_abs_diff_count{{{labels}}} {len(diffs)}",
        f"modelyard_gateway_shadow_abs_diff_sum{{{labels}}} {sum(diffs)}",
        "# TYPE modelyard_gateway_shadow_abs_diff_max gauge",
        f"modelyard_gateway_shadow_abs_diff_max{{{labels}}} {recent_max}",
        'modelyard_gateway_shadow_abs_diff_max{model="tiny",shadow_version="2",version="3"} NaN',
    ]
    return "\n".join(lines) + "\n"


def test_the_series_are_filed_under_the_shadow_version() -> None:
    values = parse_snapshot(
        gateway_body(start=1.0, matches=4, mismatches=2, errors=1, diffs=[0.5, 0.02], recent_max=0.5)
    )
    assert values[("sh_n", "tiny", 2, "match")] == 5  # 4 from v1, 1 from v3
    assert values[("sh_n", "tiny", 2, "mismatch")] == 2
    assert values[("sh_b", "tiny", 2, "1.0")] == 2
    assert values[("sh_max", "tiny", 2, "")] == 0.5  # NaN from v3 does not hide v1's value
    assert not any(key[2] == 1 for key in values)


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def gateway(store: CoordinationStore) -> tuple[Collector, Clock, dict[str, str]]:
    await store.heartbeat(
        ServiceRecord(id="gw", kind="gateway", address="10.0.0.9:50051", metrics_address="10.0.0.9:51051"),
        ttl_s=30,
    )
    bodies = {
        "10.0.0.9:51051": gateway_body(
            start=1.0, matches=0, mismatches=0, errors=0, diffs=[], recent_max=math.nan
        )
    }

    async def fetch(address: str) -> str:
        return bodies[address]

    clock = Clock()
    collector = Collector(store, window_s=60.0, fetch=fetch, clock=clock)
    await collector.scrape()
    return collector, clock, bodies


async def test_window_rate_and_largest_difference(gateway: tuple[Collector, Clock, dict[str, str]]) -> None:
    collector, clock, bodies = gateway
    clock.now += 5
    bodies["10.0.0.9:51051"] = gateway_body(
        start=1.0, matches=6, mismatches=2, errors=1, diffs=[0.3125, 0.0625] + [1e-7] * 6, recent_max=0.3125
    )
    await collector.scrape()
    clock.now += 5
    # The recent maximum has moved on to a smaller difference; the window still holds 0.3125.
    bodies["10.0.0.9:51051"] = gateway_body(
        start=1.0,
        matches=6,
        mismatches=3,
        errors=1,
        diffs=[0.3125, 0.0625, 0.01] + [1e-7] * 6,
        recent_max=0.01,
    )
    await collector.scrape()
    figures = collector.version_stats()[("tiny", 2)]
    assert figures.shadowed
    assert (figures.shadow_comparisons, figures.shadow_mismatches, figures.shadow_errors) == (9, 3, 1)
    assert figures.shadow_mismatch_rate == pytest.approx(3 / 9)
    assert figures.shadow_max_abs_diff == 0.3125

    message = _version_stats(figures)
    assert message.HasField("shadow")
    assert (message.shadow.comparisons, message.shadow.mismatches, message.shadow.errors) == (9, 3, 1)
    assert message.shadow.max_abs_diff == 0.3125

    # A shorter window (the last scrape only) has only the 0.01 comparison.
    recent = collector.version_stats(window_s=4)[("tiny", 2)]
    assert (recent.shadow_comparisons, recent.shadow_mismatches) == (1, 1)
    assert recent.shadow_max_abs_diff == 0.01


async def test_the_histogram_bounds_a_stale_gauge(gateway: tuple[Collector, Clock, dict[str, str]]) -> None:
    collector, clock, bodies = gateway
    clock.now += 5
    # The gauge still shows a large difference from before the window; the window's
    # comparisons all fell in the 1e-5 bucket.
    bodies["10.0.0.9:51051"] = gateway_body(
        start=1.0, matches=3, mismatches=0, errors=0, diffs=[3e-6] * 3, recent_max=7.0
    )
    await collector.scrape()
    figures = collector.version_stats()[("tiny", 2)]
    assert figures.shadow_mismatch_rate == 0.0
    assert figures.shadow_max_abs_diff == 1e-5


async def test_an_unshadowed_version_has_no_shadow_message(
    gateway: tuple[Collector, Clock, dict[str, str]],
) -> None:
    collector, _clock, _bodies = gateway
    figures = collector.version_stats()[("tiny", 2)]
    assert not figures.shadowed and math.isnan(figures.shadow_max_abs_diff)
    assert not _version_stats(figures).HasField("shadow")
    assert not _version_stats(VersionStats("other", 1)).HasField("shadow")


def shadowed(comparisons: float, mismatches: float, diff: float = 0.25) -> VersionStats:
    figures = VersionStats("tiny", 2, shadow_comparisons=comparisons, shadow_mismatches=mismatches)
    figures.shadow_mismatch_rate = mismatches / comparisons if comparisons else 0.0
    figures.shadow_max_abs_diff = diff if comparisons else math.nan
    return figures


def test_events_on_a_change_of_state_only() -> None:
    watch = ShadowWatch(threshold=0.0)
    assert watch.observe({("tiny", 2): shadowed(10, 0, 0.0)}) == []  # matching from the start
    [event] = watch.observe({("tiny", 2): shadowed(10, 2)})
    assert event == {
        "type": "shadow",
        "model": "tiny",
        "version": 2,
        "state": "mismatching",
        "mismatch_rate": 0.2,
        "max_abs_diff": 0.25,
        "comparisons": 10,
        "mismatches": 2,
        "threshold": 0.0,
    }
    assert watch.observe({("tiny", 2): shadowed(20, 5)}) == []  # still mismatching: no repeat
    [back] = watch.observe({("tiny", 2): shadowed(20, 0, 1e-7)})
    assert (back["state"], back["mismatch_rate"]) == ("matching", 0.0)
    assert watch.observe({("tiny", 2): shadowed(0, 0)}) == []  # no comparisons: forgotten
    [again] = watch.observe({("tiny", 2): shadowed(4, 4)})
    assert again["state"] == "mismatching"


def test_a_threshold_and_the_feed_summary() -> None:
    watch = ShadowWatch(threshold=0.1)
    assert watch.observe({("tiny", 2): shadowed(100, 5)}) == []
    [event] = watch.observe({("tiny", 2): shadowed(100, 20)})
    line = summarize({"v": 1, **event}).summary
    assert line == "shadow tiny v2 mismatching: 20.0% of 100 comparisons mismatch, max |diff| 0.25"
    event["max_abs_diff"] = None
    assert summarize(event).summary.endswith("max |diff| -")
