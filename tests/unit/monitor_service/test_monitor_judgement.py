"""The canary judgement's statistics: exact binomial tails, Wilson bounds and the binned
Mann-Whitney test against known values, and seeded simulations of many judgements: identical
samples are (almost) never worse at the stated level, a 5 % failing or 2x slower canary is."""

from __future__ import annotations

import math
import random

import pytest

from modelyard.telemetry import FINE_LATENCY_BUCKETS_S
from monitor_service.judgement import Margins, Sample, binomial_sf, judge, mann_whitney_greater, wilson_upper

BOUNDS = [*FINE_LATENCY_BUCKETS_S, math.inf]
"""The model server's request-latency buckets."""


@pytest.mark.parametrize(
    "k,n,p,expected",
    [
        (5, 100, 0.01, 0.0034323),  # 1 - P(X <= 4)
        (1, 10, 0.5, 1 - 0.5**10),
        (50, 100, 0.5, 0.5397946),
        (0, 10, 0.3, 1.0),
        (11, 10, 0.3, 0.0),
        (3, 1000, 0.0, 0.0),
    ],
)
def test_binomial_tails_are_exact(k: int, n: int, p: float, expected: float) -> None:
    assert binomial_sf(k, n, p) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_the_binomial_tail_sums_to_one_with_its_complement() -> None:
    for k in (1, 30, 60, 200):
        lower = sum(math.comb(400, i) * 0.1**i * 0.9 ** (400 - i) for i in range(k))
        assert binomial_sf(k, 400, 0.1) == pytest.approx(1 - lower, abs=1e-12)


def test_wilson_upper_bound() -> None:
    assert wilson_upper(10, 100, 0.95) == pytest.approx(0.1604, abs=1e-3)
    assert 0.0 < wilson_upper(0, 1600, 0.99) < 0.004
    assert wilson_upper(0, 0, 0.99) == 1.0


def counts(values: list[float]) -> dict[float, float]:
    out = dict.fromkeys(BOUNDS, 0.0)
    for v in values:
        out[next(b for b in BOUNDS if v <= b)] += 1
    return out


def cumulative(values: list[float]) -> list[tuple[float, float]]:
    total, out = 0.0, []
    per = counts(values)
    for bound in BOUNDS:
        total += per[bound]
        out.append((bound, total))
    return out


def test_mann_whitney_sees_a_shift_and_not_an_equal_sample() -> None:
    rng = random.Random(7)
    stable = counts([rng.expovariate(1 / 0.004) for _ in range(1500)])
    same = counts([rng.expovariate(1 / 0.004) for _ in range(300)])
    slower = counts([rng.expovariate(1 / 0.004) * 2 for _ in range(300)])
    faster = counts([rng.expovariate(1 / 0.004) / 2 for _ in range(300)])
    assert mann_whitney_greater(same, stable, BOUNDS) > 0.01
    assert mann_whitney_greater(slower, stable, BOUNDS) < 1e-6
    assert mann_whitney_greater(faster, stable, BOUNDS) > 0.99  # one-sided
    assert mann_whitney_greater({}, stable, BOUNDS) == 1.0
    assert mann_whitney_greater({0.001: 5.0}, {0.001: 9.0}, BOUNDS) == 1.0  # all ties


def latencies(rng: random.Random, n: int, scale: float = 1.0) -> list[float]:
    """A service-time-like distribution: 10 ms plus an exponential tail, a few slow calls."""
    return [
        (0.010 + rng.expovariate(1 / 0.005)) * scale * (4 if rng.random() < 0.01 else 1) for _ in range(n)
    ]


def sample(rng: random.Random, n: int, error_rate: float = 0.0, scale: float = 1.0) -> Sample:
    errors = sum(rng.random() < error_rate for _ in range(n))
    return Sample(n, errors, cumulative(latencies(rng, n, scale)))


def test_identical_canaries_are_not_judged_worse_and_worse_ones_are() -> None:
    rng = random.Random(2026)
    margins = Margins(min_requests=100)
    alpha = 0.01
    false = sum(judge(sample(rng, 150), sample(rng, 1350), margins, alpha).worse for _ in range(400))
    assert false <= 2  # at most 0.5 % of 400 independent judgements, at alpha 1 %
    failing = sum(
        judge(sample(rng, 300, error_rate=0.05), sample(rng, 2700), margins, alpha).worse for _ in range(100)
    )
    slow = sum(
        judge(sample(rng, 300, scale=2.0), sample(rng, 2700), margins, alpha).worse for _ in range(100)
    )
    assert failing >= 90 and slow >= 99


def test_a_significant_but_small_difference_is_not_worse() -> None:
    """50,000 calls make a 10 % slower canary significant; the effect-size gate keeps it."""
    rng = random.Random(3)
    verdict = judge(sample(rng, 50_000, scale=1.1), sample(rng, 50_000), Margins(), 0.01)
    assert not verdict.worse and any("rank test p=<1e-4" in note for note in verdict.notes)


def test_the_verdict_says_why() -> None:
    rng = random.Random(4)
    verdict = judge(sample(rng, 300, error_rate=0.2), sample(rng, 3000), Margins(), 0.01)
    (problem,) = verdict.problems
    assert problem.startswith("error rate 0.2") and "allowed 0.01 more" in problem
    few = judge(sample(rng, 300), sample(rng, 50), Margins(min_requests=100), 0.01)
    assert "latency not judged: stable has 50 < 100 requests" in few.notes
