"""Drift as a test: the chi-square and normal tails against closed forms, Holm's correction,
sparse bins merged, and seeded simulations through the real `DriftDetector` — identical
traffic is not significant across 32 features window after window, whatever the window's
size, while a +1σ shift of one feature is."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modelyard.baseline import compute_baseline, population_stability_index
from monitor_service.collector import FeatureStats, VersionStats
from monitor_service.drift import DriftDetector
from monitor_service.rules import Baseline
from monitor_service.significance import (
    chi_square_sf,
    chi_square_test,
    holm,
    mean_z_test,
    upper_gamma_regularized,
)

FEATURES = 32
ALPHA = 0.001


def test_the_chi_square_tail_matches_known_values_and_closed_forms() -> None:
    # The 95th percentiles of the tables.
    assert chi_square_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi_square_sf(11.070497693516351, 5) == pytest.approx(0.05, rel=1e-9)
    assert chi_square_sf(16.918977604620448, 9) == pytest.approx(0.05, rel=1e-9)
    assert chi_square_sf(21.665994333461924, 9) == pytest.approx(0.01, rel=1e-9)
    # Closed forms, on both sides of x = a + 1 (series / continued fraction) and far in the tail.
    for x in (0.01, 0.5, 1.0, 2.0, 3.0, 7.5, 20.0, 60.0, 150.0, 400.0):
        assert chi_square_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)
        assert chi_square_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
        assert chi_square_sf(x, 4) == pytest.approx(math.exp(-x / 2) * (1 + x / 2), rel=1e-10)
    assert chi_square_sf(0.0, 3) == 1.0 and chi_square_sf(math.inf, 3) == 0.0
    assert upper_gamma_regularized(1.0, 1.0) == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError):
        chi_square_sf(1.0, 0)


def test_holm_multiplies_by_the_rank_and_keeps_the_order() -> None:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
    assert mean_z_test(1.959963984540054, 1, 0.0, 1.0) == pytest.approx(0.05)
    assert mean_z_test(0.1, 100, 0.0, 1.0, baseline_items=100) == pytest.approx(
        math.erfc(0.1 / math.sqrt(0.02) / math.sqrt(2))
    )
    assert math.isnan(mean_z_test(0.0, 0, 0.0, 1.0)) and math.isnan(mean_z_test(0.0, 5, 0.0, 0.0))


def test_sparse_bins_are_merged_and_too_few_items_are_no_test() -> None:
    # 30 items over ten 10 % bins expect 3 each: merged in pairs (6 each), 5 groups.
    test = chi_square_test([30] + [0] * 9, [0.1] * 10)
    assert test is not None and test.groups == 5 and test.df == 4 and test.p_value < 1e-20
    # A bin the baseline never saw (a discrete feature's empty top bin) joins its neighbour.
    test = chi_square_test([40, 40, 0], [0.5, 0.5, 0.0])
    assert test is not None and test.groups == 2 and test.p_value == pytest.approx(1.0)
    assert chi_square_test([3, 2], [0.5, 0.5]) is None  # 5 items: one group only
    assert chi_square_test([1, 2], [1.0]) is None
    # The two-sample form allows for the baseline's own sampling noise: a smaller statistic.
    observed, fractions = [20, 10, 10, 20], [0.25] * 4
    exact = chi_square_test(observed, fractions)
    sampled = chi_square_test(observed, fractions, baseline_items=60)
    assert exact is not None and sampled is not None and sampled.statistic < exact.statistic


def test_one_empty_bin_no_longer_dominates_the_psi() -> None:
    # The figure: 51 items, one decile bin empty, the rest even.
    counts = [0] + [51 / 9] * 9
    floored = sum(
        (max(a / 51, 1e-4) - 0.1) * math.log(max(a / 51, 1e-4) / 0.1) for a in counts
    )  # the old 1e-4 floor
    assert floored > 0.69
    assert population_stability_index([0.1] * 10, counts, expected_items=4000) < 0.4
    assert population_stability_index([0.1] * 10, [10] * 10, expected_items=4000) == pytest.approx(0.0)


BASELINE_SAMPLE = torch.randn(4000, FEATURES, generator=torch.Generator().manual_seed(11))
BASELINES = compute_baseline({"x": BASELINE_SAMPLE})
EDGES = [np.array(f.bin_edges) for f in BASELINES[0].features]


def window(rng: np.random.Generator, items: int, shift: float = 0.0) -> VersionStats:
    """One window's figures as the collector builds them: bin counts and moments per feature."""
    rows = rng.standard_normal((items, FEATURES))
    rows[:, 3] += shift
    figures = VersionStats(model="m", version=1)
    for f in range(FEATURES):
        column = rows[:, f]
        counts = np.bincount(np.searchsorted(EDGES[f], column, side="left"), minlength=len(EDGES[f]) + 1)
        figures.input_bins[f"x/{f}"] = [float(c) for c in counts]
        figures.inputs[f"x/{f}"] = FeatureStats(items, float(column.mean()), float(column.var()))
    return figures


def test_identical_traffic_is_not_significant_across_32_features_whatever_the_window_size() -> None:
    detector = DriftDetector(min_items=50)
    detector.set_registry_baselines("m", 1, BASELINES)
    rng = np.random.default_rng(2024)
    smallest, false_at_5_percent, windows = 1.0, 0, 0
    for items in (50, 51, 80, 120, 150, 600):  # the window sizes, and larger
        for _ in range(150):
            figures = window(rng, items)
            detector.apply({("m", 1): figures})
            windows += 1
            smallest = min(smallest, figures.input_drift_p)
            false_at_5_percent += figures.input_drift_p < 0.05
            (worst, *_) = detector.tests[("m", 1)]
            assert worst.test == "chi2" and len(detector.tests[("m", 1)]) == FEATURES
    assert smallest > ALPHA  # 900 windows of 32 features: never significant at the rule's alpha
    # The tests are calibrated and Holm holds the family-wise rate at alpha: 45 of 900 windows
    # (5.0 %) at 5 %, with this seed.
    assert false_at_5_percent / windows < 0.07


def test_a_one_sigma_shift_of_one_feature_is_significant() -> None:
    detector = DriftDetector(min_items=50)
    detector.set_registry_baselines("m", 1, BASELINES)
    rng = np.random.default_rng(7)
    detected = 0
    for _ in range(100):
        figures = window(rng, 120, shift=1.0)
        detector.apply({("m", 1): figures})
        detected += figures.input_drift_p < ALPHA
        assert detector.tests[("m", 1)][0].feature == "x/3"
    assert detected >= 99
    # The effect sizes still say how far it moved.
    assert figures.input_drift == pytest.approx(1.0, abs=0.35) and figures.input_psi > 0.25


def test_features_without_bins_get_a_z_test_of_their_mean() -> None:
    detector = DriftDetector({"m": {"x": Baseline([0.0] * FEATURES, [1.0] * FEATURES)}}, min_items=50)
    rng = np.random.default_rng(5)
    smallest = 1.0
    for _ in range(300):
        figures = window(rng, 120)
        figures.input_bins.clear()  # a rule-file baseline: mean and std only
        detector.apply({("m", 1): figures})
        smallest = min(smallest, figures.input_drift_p)
        assert {t.test for t in detector.tests[("m", 1)]} == {"z"}
    assert smallest > ALPHA
    shifted = window(rng, 120, shift=1.0)
    shifted.input_bins.clear()
    detector.apply({("m", 1): shifted})
    assert shifted.input_drift_p < 1e-6


def test_no_baseline_or_too_few_items_is_no_data() -> None:
    detector = DriftDetector(min_items=50)
    detector.set_registry_baselines("m", 1, BASELINES)
    rng = np.random.default_rng(3)
    few, unknown, idle = window(rng, 30, shift=3.0), window(rng, 500), VersionStats(model="m", version=1)
    detector.apply({("m", 1): few, ("m", 2): unknown})
    assert math.isnan(few.input_drift_p) and math.isnan(few.input_psi) and math.isnan(few.input_drift)
    assert math.isnan(unknown.input_drift_p)  # v2 has no baseline (and none learned yet)
    detector.apply({("m", 1): idle})
    assert math.isnan(idle.input_drift_p) and math.isnan(idle.input_psi)
