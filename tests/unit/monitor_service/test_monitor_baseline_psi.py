"""The binned half of the drift contract: the model server counts sampled items per baseline
bin and exports the counts; the monitor parses them, and scores the window's PSI against the
baseline the registry recorded, with rule file > registry > learned for the mean shift."""

from __future__ import annotations

import math

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from model_server.stats import InputBinCounts
from modelyard.baseline import compute_baseline
from monitor_service.collector import FeatureStats, VersionStats, _version_stats, parse_snapshot
from monitor_service.drift import DriftDetector
from monitor_service.rules import Baseline

GENERATOR = torch.Generator().manual_seed(0)
SAMPLE = torch.randn(5000, 3, generator=GENERATOR)
BASELINES = compute_baseline({"x": SAMPLE})


def exported(counts: InputBinCounts) -> str:
    registry = CollectorRegistry()
    registry.register(counts)
    return generate_latest(registry).decode()


def test_sampled_items_are_counted_per_bin_and_parsed_by_the_monitor() -> None:
    counts = InputBinCounts()
    counts.register("m", 2, BASELINES)
    counts.register("m", 2, BASELINES)  # a second load of the version: idempotent
    rows = SAMPLE[:1000].to(torch.float64)
    counts.count(("m", "2"), "x", rows.numpy())
    counts.count(("m", "2"), "other", rows.numpy())  # an input without a baseline is not counted
    counts.count(("m", "3"), "x", rows.numpy())  # nor a version without one

    values = parse_snapshot(exported(counts))
    bins = {detail: v for (what, model, version, detail), v in values.items() if what == "in_b"}
    assert len(bins) == 3 * 10 and {k[1:3] for k in values} == {("m", 2)}
    for feature in range(3):
        per_bin = [bins[f"x/{feature}/{i}"] for i in range(10)]
        assert sum(per_bin) == 1000
        # The same convention as the baseline's: its own items fall into its own fractions.
        edges = torch.tensor(list(BASELINES[0].features[feature].bin_edges), dtype=torch.float64)
        expected = torch.bincount(torch.searchsorted(edges, rows[:, feature].contiguous()), minlength=10)
        assert per_bin == expected.tolist()

    grouped = {(what, detail): v for (what, model, version, detail), v in values.items() if model}
    stats = _version_stats(("m", 2), grouped, 60.0)
    assert sorted(stats.input_bins) == ["x/0", "x/1", "x/2"] and sum(stats.input_bins["x/1"]) == 1000


def test_wide_inputs_count_only_the_described_columns_and_values_beyond_the_edges_land_in_the_end_bins() -> (
    None
):
    counts = InputBinCounts()
    counts.register("m", 1, BASELINES)
    wide = torch.full((4, 40), 1e9, dtype=torch.float64)  # more columns than the baseline has
    wide[0, 0] = -1e9
    counts.count(("m", "1"), "x", wide.numpy())
    values = parse_snapshot(exported(counts))
    bins = {detail: v for (what, _m, _v, detail), v in values.items() if what == "in_b"}
    assert bins["x/0/0"] == 1 and bins["x/0/9"] == 3 and bins["x/2/9"] == 4


def psi_figures(shift: float, items: int = 2000) -> VersionStats:
    counts = InputBinCounts()
    counts.register("m", 1, BASELINES)
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(items, 3, generator=generator, dtype=torch.float64)
    rows[:, 2] += shift
    counts.count(("m", "1"), "x", rows.numpy())
    values = parse_snapshot(exported(counts))
    grouped = {(what, detail): v for (what, model, version, detail), v in values.items() if model}
    figures = _version_stats(("m", 1), grouped, 60.0)
    figures.inputs = {
        f"x/{f}": FeatureStats(items, float(rows[:, f].mean()), float(rows[:, f].var())) for f in range(3)
    }
    return figures


def test_psi_against_the_registry_baseline_is_small_unshifted_and_large_shifted() -> None:
    detector = DriftDetector(min_items=100)
    detector.set_registry_baselines("m", 1, BASELINES)
    steady, shifted = psi_figures(0.0), psi_figures(1.0)
    detector.apply({("m", 1): steady, ("m", 2): shifted})
    # Version 2 has no registry baseline: no PSI, and its mean shift uses the learned one (none yet).
    assert math.isnan(shifted.input_psi) and math.isnan(shifted.input_drift)
    assert math.isnan(shifted.input_drift_p)
    detector.apply({("m", 1): shifted})
    assert steady.input_psi < 0.05 and steady.input_drift < 0.1
    assert shifted.input_psi > 0.25 and shifted.input_drift == pytest.approx(1.0, abs=0.1)

    few = psi_figures(1.0, items=50)
    detector.apply({("m", 1): few})
    assert math.isnan(few.input_psi)  # fewer binned items than min_items: no score


def test_the_rule_file_baseline_wins_over_the_registry_for_the_mean_shift() -> None:
    detector = DriftDetector({"m": {"x": Baseline([1.0, 0.0, 1.0], [1.0, 1.0, 1.0])}}, min_items=100)
    detector.set_registry_baselines("m", 1, BASELINES)
    figures = psi_figures(1.0)
    detector.apply({("m", 1): figures})
    # Against the rule file, feature 0 moved by -1 and feature 2 did not: the drift is ~1 from
    # feature 0; the PSI still comes from the registry's bins, where feature 2 moved.
    assert figures.input_drift == pytest.approx(1.0, abs=0.1) and figures.input_psi > 0.25
    assert detector.baseline("m", 1) == detector.baselines["m"]
    assert detector.baseline("n", 1) is None
