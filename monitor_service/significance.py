"""Significance tests for input drift, in pure Python: chi-square on bin counts, a z-test of a
mean, and Holm's correction for testing many features at once.

Every function takes plain numbers and returns a p-value: the probability, were the window
drawn from the baseline's distribution, of a statistic at least this far from it. The
chi-square tail is the regularized upper incomplete gamma function Q(k/2, x/2), computed with
`math.lgamma` and the series or the continued fraction of Numerical Recipes (§6.2), to a
relative error of about 1e-12.

Usage::

    test = chi_square_test(window_counts, baseline_fractions, baseline_items=4000)
    if test is not None:
        p = test.p_value
    corrected = holm([p0, p1, p2])   # same order, each multiplied by its Holm factor
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "MIN_EXPECTED",
    "ChiSquareTest",
    "chi_square_sf",
    "chi_square_test",
    "holm",
    "mean_z_test",
    "upper_gamma_regularized",
]

MIN_EXPECTED = 5.0
"""The fewest items a bin group must expect in the window for the chi-square approximation
(Cochran's rule): sparser neighbouring bins are merged until they do."""

_EPSILON = 1e-15
_TINY = 1e-300
_MAX_ITERATIONS = 10_000


def upper_gamma_regularized(a: float, x: float) -> float:
    """Q(a, x) = Γ(a, x) / Γ(a), for a > 0 and x >= 0 (1 at x = 0, falling to 0).

    Raises:
        ValueError: a <= 0 or x < 0.
    """
    if a <= 0 or x < 0:
        raise ValueError(f"Q(a, x) needs a > 0 and x >= 0, not a={a}, x={x}")
    if x == 0:
        return 1.0
    if math.isinf(x):
        return 0.0
    log_prefix = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1.0:
        # The series of the lower function P converges fast here; Q = 1 - P.
        term = total = 1.0 / a
        denominator = a
        for _ in range(_MAX_ITERATIONS):
            denominator += 1.0
            term *= x / denominator
            total += term
            if abs(term) < abs(total) * _EPSILON:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Continued fraction for Q (modified Lentz), which converges fast for x > a + 1.
    b = x + 1.0 - a
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = _TINY if abs(d) < _TINY else d
        c = b + an / c
        c = _TINY if abs(c) < _TINY else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPSILON:
            break
    return min(1.0, math.exp(log_prefix) * h)


def chi_square_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X chi-square with `df` degrees of freedom.

    Raises:
        ValueError: df < 1.
    """
    if df < 1:
        raise ValueError(f"a chi-square needs at least 1 degree of freedom, not {df}")
    return upper_gamma_regularized(df / 2.0, max(statistic, 0.0) / 2.0)


@dataclass(frozen=True)
class ChiSquareTest:
    """The outcome of one chi-square test of a window's bin counts."""

    statistic: float
    df: int
    p_value: float
    groups: int
    """Bins after merging sparse neighbours (df + 1)."""


def chi_square_test(
    observed: Sequence[float],
    fractions: Sequence[float],
    *,
    baseline_items: float = 0.0,
    min_expected: float = MIN_EXPECTED,
) -> ChiSquareTest | None:
    """Test whether the window's bin counts come from the baseline's bin fractions.

    Neighbouring bins are merged, in order, until each group expects at least
    `min_expected` of the window's items from the baseline's fractions (the grouping depends
    only on the baseline and the window's size, never on the counts themselves, so it does
    not bias the test). With `baseline_items`, the baseline is itself a sample of that many
    items and the test is the two-sample one (a 2 × groups contingency table), which does
    not mistake the baseline's own sampling noise for drift; without, the fractions are
    taken as exact (goodness of fit).

    Args:
        observed: Items per bin in the window.
        fractions: The baseline's fraction of items per bin (summing to about 1).
        baseline_items: The size of the baseline's sample; 0 for exact fractions.
        min_expected: The fewest window items a group must expect.

    Returns:
        The test, or None when it cannot be made: different lengths, no items, or fewer than
        two groups once merged (too few items for the bins).
    """
    if len(observed) != len(fractions) or not observed:
        return None
    items = float(sum(observed))
    weight = float(sum(fractions))
    if items <= 0 or weight <= 0:
        return None
    groups: list[tuple[float, float]] = []  # (observed, fraction) per group
    seen, share = 0.0, 0.0
    for count, fraction in zip(observed, fractions, strict=True):
        seen += count
        share += fraction / weight
        if share * items >= min_expected * (1 - 1e-9):  # 0.1 + 0.2 is not 0.3
            groups.append((seen, share))
            seen, share = 0.0, 0.0
    if seen or share:
        if not groups:
            return None
        last_seen, last_share = groups.pop()
        groups.append((last_seen + seen, last_share + share))
    if len(groups) < 2:
        return None
    statistic = 0.0
    if baseline_items > 0:
        # Both samples against their pooled proportion per group.
        total = items + baseline_items
        for seen, share in groups:
            base = share * baseline_items
            pooled = (seen + base) / total
            if pooled <= 0:
                continue
            expected_window, expected_base = items * pooled, baseline_items * pooled
            statistic += (seen - expected_window) ** 2 / expected_window
            statistic += (base - expected_base) ** 2 / expected_base
    else:
        for seen, share in groups:
            expected = share * items
            statistic += (seen - expected) ** 2 / expected
    df = len(groups) - 1
    return ChiSquareTest(statistic, df, chi_square_sf(statistic, df), len(groups))


def mean_z_test(
    mean: float, items: float, baseline_mean: float, baseline_std: float, *, baseline_items: float = 0.0
) -> float:
    """Two-sided p-value of a window's mean of `items` items against the baseline's mean.

    The standard error is the baseline's std over √items (the mean of n items from the
    baseline's distribution), widened by the baseline's own sampling error when it was
    estimated from `baseline_items` items (0: exact). Relies on the central limit theorem:
    for a heavy-tailed feature and few items its tail is optimistic, which is why binned
    features are tested with `chi_square_test` instead.

    Returns:
        The p-value; NaN when there are no items or the std is not positive.
    """
    if items <= 0 or baseline_std <= 0:
        return math.nan
    variance = baseline_std**2 * (1.0 / items + (1.0 / baseline_items if baseline_items > 0 else 0.0))
    z = abs(mean - baseline_mean) / math.sqrt(variance)
    return math.erfc(z / math.sqrt(2.0))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of p-values from tests made together, in their order.

    The smallest is multiplied by m (the number of tests), the next by m - 1, and so on,
    each kept at least as large as the one before and at most 1. Rejecting every adjusted
    p-value below alpha keeps the chance of any false alarm among the m tests below alpha,
    whatever their dependence. The smallest adjusted value is the Bonferroni one.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
