"""Is the canary worse than the stable version, beyond noise? Pure statistics, no I/O.

A canary is judged on two questions, each a one-sided test at significance `alpha`, and each
answered "worse" only when the difference is significant *and* larger than the margin an
operator set (the effect size), the way Kayenta pairs a Mann-Whitney U test with effect-size
thresholds:

- **errors**: an exact binomial test of the canary's error count against `p0`, the stable
  error rate's upper confidence bound (Wilson score, at the same confidence) plus
  `max_error_rate_increase`. Worse when P(X >= errors | canary requests, p0) < alpha, which
  can only happen when the canary's observed rate is above p0.
- **latency**: a Mann-Whitney U test of "canary latencies tend to be larger" over the two
  latency histograms (every bucket a group of ties; normal approximation with the tie
  correction), and the canary's `latency_quantile` above the stable one's times
  `max_latency_ratio` plus `latency_slack_s`. Judged only with `min_requests` on both sides.

A p99 over a hundred requests is decided by its one or two slowest calls; a rank test over
whole distributions is not, and the effect-size gate keeps a statistically significant but
harmless difference (a canary 3 % slower over 50,000 calls) from rolling anything back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from monitor_service.collector import histogram_quantile

__all__ = [
    "Margins",
    "Sample",
    "Verdict",
    "binomial_sf",
    "judge",
    "mann_whitney_greater",
    "wilson_upper",
]

_NORMAL = NormalDist()


@dataclass(frozen=True)
class Sample:
    """One side's calls over the window."""

    requests: int
    errors: int
    latency: Sequence[tuple[float, float]] = ()
    """The latency histogram as (upper bound in s, cumulative count) pairs, Prometheus style."""

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float:
        return histogram_quantile(q, self.latency)


@dataclass(frozen=True)
class Margins:
    """What counts as worse, beyond noise."""

    min_requests: int = 100
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    latency_slack_s: float = 0.002
    latency_quantile: float = 0.9


@dataclass(frozen=True)
class Verdict:
    """A judgement and the figures behind it, in words."""

    worse: bool
    """Worse beyond the margins, and significantly so: roll it back."""
    within: bool
    """Every observed figure within the margins (not worse). Neither worse nor within: the
    canary looks worse but the sample cannot tell yet (wait for more)."""
    problems: tuple[str, ...]
    """Why it is worse, or looks it (empty when within)."""
    notes: tuple[str, ...]
    """What was tested and found within the margins, or not tested and why."""


def judge(canary: Sample, stable: Sample, margins: Margins, alpha: float) -> Verdict:
    """Compare a canary with the stable version at significance `alpha` (one-sided, per
    question). The canary needs `margins.min_requests`; the caller checks it first."""
    problems: list[str] = []
    suspect: list[str] = []
    notes: list[str] = []
    confidence = 1.0 - alpha

    stable_bound = wilson_upper(stable.errors, stable.requests, confidence) if stable.requests else 0.0
    p0 = min(1.0, stable_bound + margins.max_error_rate_increase)
    p_errors = binomial_sf(canary.errors, canary.requests, p0)
    errors = (
        f"error rate {canary.error_rate:.3f} ({canary.errors}/{canary.requests}) vs stable "
        f"{stable.error_rate:.3f} ({stable.errors}/{stable.requests}), allowed "
        f"{margins.max_error_rate_increase:g} more (p={_p(p_errors)})"
    )
    if p_errors < alpha:
        problems.append(errors)
    elif canary.error_rate > stable.error_rate + margins.max_error_rate_increase:
        suspect.append(errors)
    else:
        notes.append(errors)

    q = margins.latency_quantile
    label = f"p{q * 100:g}"
    if stable.requests < margins.min_requests:
        notes.append(f"latency not judged: stable has {stable.requests} < {margins.min_requests} requests")
    else:
        canary_q, stable_q = canary.quantile(q), stable.quantile(q)
        if math.isnan(canary_q) or math.isnan(stable_q):
            notes.append("latency not judged: no latency histogram")
        else:
            allowed = stable_q * margins.max_latency_ratio + margins.latency_slack_s
            p_latency = mann_whitney_greater(
                _counts(canary.latency), _counts(stable.latency), _bounds(canary, stable)
            )
            latency = (
                f"{label} {canary_q * 1000:.1f}ms vs allowed {allowed * 1000:.1f}ms (stable "
                f"{stable_q * 1000:.1f}ms x {margins.max_latency_ratio:g} + "
                f"{margins.latency_slack_s * 1000:g}ms; rank test p={_p(p_latency)})"
            )
            if canary_q <= allowed:
                notes.append(latency)
            else:
                (problems if p_latency < alpha else suspect).append(latency)
    if problems:
        return Verdict(True, False, tuple(problems), tuple(notes + suspect))
    return Verdict(False, not suspect, tuple(suspect), tuple(notes))


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _bounds(*samples: Sample) -> list[float]:
    return sorted({bound for sample in samples for bound, _ in sample.latency})


def _counts(histogram: Sequence[tuple[float, float]]) -> dict[float, float]:
    """Cumulative (bound, count) pairs to the count in each bucket."""
    out: dict[float, float] = {}
    previous = 0.0
    for bound, cumulative in sorted(histogram):
        out[bound] = max(cumulative - previous, 0.0)
        previous = max(previous, cumulative)
    return out


def mann_whitney_greater(
    canary: dict[float, float], stable: dict[float, float], bounds: Sequence[float]
) -> float:
    """One-sided p-value of "canary values tend to be larger than stable ones" from binned
    counts (`bounds` ascending; every bucket's members tie), by the normal approximation of
    the Mann-Whitney U statistic with the tie correction and a continuity correction.

    Returns 1.0 when either side is empty or every value ties.
    """
    n1 = sum(canary.get(b, 0.0) for b in bounds)
    n2 = sum(stable.get(b, 0.0) for b in bounds)
    if n1 <= 0 or n2 <= 0:
        return 1.0
    u = 0.0  # pairs (canary, stable) with canary > stable, ties counting one half
    below = 0.0
    ties = 0.0
    for bound in bounds:
        a, b = canary.get(bound, 0.0), stable.get(bound, 0.0)
        u += a * (below + b / 2.0)
        below += b
        t = a + b
        ties += t * t * t - t
    n = n1 + n2
    variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))
    if variance <= 0:
        return 1.0
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return 1.0 - _NORMAL.cdf(z)


def wilson_upper(successes: int, trials: int, confidence: float) -> float:
    """The upper end of the one-sided Wilson score interval for a binomial proportion."""
    if trials <= 0:
        return 1.0
    z = _NORMAL.inv_cdf(confidence)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = p + z * z / (2.0 * trials)
    spread = z * math.sqrt(p * (1.0 - p) / trials + z * z / (4.0 * trials * trials))
    return min(1.0, (centre + spread) / denominator)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (summed in log space from the nearer tail)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)

    def log_pmf(i: int) -> float:
        return log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q

    mode = int((n + 1) * p)
    if k > mode:  # the upper tail is the small one: sum it, terms falling from k on
        return min(1.0, _sum_falling(log_pmf, range(k, n + 1)))
    return max(0.0, 1.0 - _sum_falling(log_pmf, range(k - 1, -1, -1)))


def _sum_falling(log_term: Callable[[int], float], indices: range) -> float:
    """Sum exp(log_term(i)) over `indices`, whose terms fall monotonically; stops once the
    rest cannot matter (a term below 1e-18 of the sum)."""
    total = 0.0
    first: float | None = None
    for i in indices:
        value = log_term(i)
        if first is None:
            first = value
        term = math.exp(value - first)
        total += term
        if term < 1e-18 * total:
            break
    return 0.0 if first is None else total * math.exp(first)
