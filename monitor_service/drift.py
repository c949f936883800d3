"""Input drift: the window's input statistics of each version against its baseline.

Model servers export, for a sample of requests, the count, sum and sum of squares of every
input feature, and for versions registered with a binned baseline the items per bin
(`model_server/stats.py`); the collector turns window deltas into a mean and a variance per
feature, and counts per bin. Three figures per version:

- `input_drift_p`: the test. Every feature is tested on its own: a chi-square test of its bin
  counts against the registry baseline's bin fractions (two-sample, since the baseline is a
  sample too; sparse bins merged: `monitor_service.significance.chi_square_test`), or, for a
  feature without bins, a z-test of its mean against the baseline's mean and std. The
  p-values are corrected for the number of features tested (Holm) and the smallest is the
  figure: below alpha, the chance that identical traffic got there is below alpha, however
  many features and whatever the window's size.
- `input_drift`: the largest standardised mean shift over its features,
  `|mean_window - mean_baseline| / std_baseline`: 0 for identical inputs, about 1 when a
  feature moved by one baseline standard deviation (an effect size, not a test).
- `input_psi`: the largest population stability index over its features, from the bin counts
  (smoothed) against the baseline's bin fractions (`modelyard.baseline.population_stability_index`):
  0 for identical distributions, 0.1 a moderate shift, 0.25 a large one, but noisy in small
  windows (also an effect size).

Each is NaN ("no data") while the window holds fewer than `min_items` sampled items, or the
version has no baseline to compare with, so that an alert on it is not resolved by data
running out.

The baseline of a version comes, first found first used, from the rule file (`baselines:`,
per model: mean and std), from the registry (recorded with the version at registration:
mean, std and bins), or is learned from the first `learn_items` sampled items the monitor
sees for the model and then frozen (mean and std). The PSI and the chi-square test need bins,
so only a registry baseline gives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from modelyard.baseline import population_stability_index
from modelyard.v1 import registry_pb2
from monitor_service.collector import VersionStats
from monitor_service.rules import Baseline
from monitor_service.significance import chi_square_test, holm, mean_z_test

__all__ = ["DriftDetector", "FeatureTest", "RegistryBaseline"]


@dataclass(frozen=True)
class FeatureTest:
    """One feature's test in one window."""

    feature: str
    """"input/column"."""
    test: str
    """"chi2" (bin counts) or "z" (mean)."""
    items: float
    p_value: float
    """Before the correction for the number of features tested."""
    adjusted_p: float
    """After it (Holm)."""


@dataclass(frozen=True)
class RegistryBaseline:
    """One input's baseline as the registry recorded it with a version."""

    reference: Baseline
    """Mean and standard deviation per feature (std 0: a constant feature, no mean shift)."""
    fractions: list[list[float]]
    """Per feature, the fraction of the baseline's items in each bin (empty: no bins)."""
    items: float = 0.0
    """The items the baseline was computed from (0: unknown)."""

    @classmethod
    def of(cls, message: registry_pb2.InputBaseline) -> RegistryBaseline:
        return cls(
            Baseline([f.mean for f in message.features], [f.std for f in message.features]),
            [list(f.bin_fractions) for f in message.features],
            float(message.item_count),
        )


@dataclass
class DriftDetector:
    """Computes `input_drift_p`, `input_drift` and `input_psi` for every version's figures.

    Args:
        baselines: model -> input -> baseline, from the rule file (they win).
        learn_items: Items to learn a baseline from when nothing else gives one for a model.
        min_items: Fewer sampled items (or binned items) of a feature in the window: it is
            not scored nor tested.
    """

    baselines: dict[str, dict[str, Baseline]] = field(default_factory=dict)
    learn_items: int = 1000
    min_items: int = 50
    learned: dict[str, dict[str, Baseline]] = field(default_factory=dict)
    learned_items: dict[str, float] = field(default_factory=dict)
    """model -> the items its learned baseline came from."""
    registry: dict[tuple[str, int], dict[str, RegistryBaseline]] = field(default_factory=dict)
    """(model, version) -> input -> baseline recorded in the registry; set by the monitor."""
    tests: dict[tuple[str, int], list[FeatureTest]] = field(default_factory=dict)
    """(model, version) -> the tests of the last `apply`, smallest adjusted p-value first."""

    def set_registry_baselines(
        self, model: str, version: int, baselines: list[registry_pb2.InputBaseline]
    ) -> None:
        """Record what the registry holds for a version (nothing, for a version without one)."""
        if baselines:
            self.registry[(model, version)] = {b.input: RegistryBaseline.of(b) for b in baselines}

    def baseline(self, model: str, version: int) -> dict[str, Baseline] | None:
        """The mean/std reference of a version: rule file > registry > learned."""
        if model in self.baselines:
            return self.baselines[model]
        recorded = self.registry.get((model, version))
        if recorded is not None:
            return {name: b.reference for name, b in recorded.items()}
        return self.learned.get(model)

    def _baseline_items(self, model: str, version: int, name: str) -> float:
        """How many items the mean/std reference was estimated from (0: exact, the rule file's)."""
        if model in self.baselines:
            return 0.0
        recorded = self.registry.get((model, version))
        if recorded is not None:
            base = recorded.get(name)
            return base.items if base is not None else 0.0
        return self.learned_items.get(model, 0.0)

    def apply(self, stats: dict[tuple[str, int], VersionStats]) -> None:
        """Set the drift figures of every version (and learn baselines still missing)."""
        for (model, version), figures in stats.items():
            figures.input_drift = figures.input_psi = figures.input_drift_p = math.nan
            self.tests.pop((model, version), None)
            if not figures.inputs and not figures.input_bins:
                continue
            recorded = self.registry.get((model, version))
            figures.input_psi, binned = self._bins(recorded, figures)
            reference = self.baseline(model, version)
            if reference is None:
                self._learn(model, figures)
            else:
                figures.input_drift = self._mean_shift(reference, figures)
            raw = list(binned)
            tested = {feature for feature, *_ in binned}
            for key, feature in figures.inputs.items():
                if key in tested or reference is None or feature.count < self.min_items:
                    continue
                name, _, index = key.rpartition("/")
                base, column = reference.get(name), int(index)
                if base is None or column >= len(base.mean) or base.std[column] <= 0:
                    continue
                p = mean_z_test(
                    feature.mean,
                    feature.count,
                    base.mean[column],
                    base.std[column],
                    baseline_items=self._baseline_items(model, version, name),
                )
                raw.append((key, "z", feature.count, p))
            if not raw:
                continue
            adjusted = holm([p for *_, p in raw])
            results = sorted(
                (
                    FeatureTest(key, kind, items, p, q)
                    for (key, kind, items, p), q in zip(raw, adjusted, strict=True)
                ),
                key=lambda t: (t.adjusted_p, t.feature),
            )
            self.tests[(model, version)] = results
            figures.input_drift_p = results[0].adjusted_p

    def _mean_shift(self, reference: dict[str, Baseline], figures: VersionStats) -> float:
        score = math.nan
        for key, feature in figures.inputs.items():
            if feature.count < self.min_items:
                continue
            name, _, index = key.rpartition("/")
            base = reference.get(name)
            column = int(index)
            if base is None or column >= len(base.mean) or base.std[column] <= 0:
                continue
            shift = abs(feature.mean - base.mean[column]) / base.std[column]
            score = shift if math.isnan(score) else max(score, shift)
        return score

    def _bins(
        self, recorded: dict[str, RegistryBaseline] | None, figures: VersionStats
    ) -> tuple[float, list[tuple[str, str, float, float]]]:
        """The largest PSI (NaN: none), and a chi-square p-value per binned feature."""
        if recorded is None:
            return math.nan, []
        score = math.nan
        tests: list[tuple[str, str, float, float]] = []
        for key, counts in figures.input_bins.items():
            items = sum(counts)
            if items < self.min_items:
                continue
            name, _, index = key.rpartition("/")
            base = recorded.get(name)
            column = int(index)
            if base is None or column >= len(base.fractions) or not base.fractions[column]:
                continue
            expected = base.fractions[column]
            observed = (counts + [0.0] * len(expected))[: len(expected)]
            value = population_stability_index(expected, observed, expected_items=base.items)
            if not math.isnan(value):
                score = value if math.isnan(score) else max(score, value)
            test = chi_square_test(observed, expected, baseline_items=base.items)
            if test is not None:
                tests.append((key, "chi2", items, test.p_value))
        return score, tests

    def _learn(self, model: str, figures: VersionStats) -> None:
        per_input: dict[str, dict[int, tuple[float, float]]] = {}
        for key, feature in figures.inputs.items():
            if feature.count < self.learn_items:
                return
            name, _, index = key.rpartition("/")
            per_input.setdefault(name, {})[int(index)] = (feature.mean, math.sqrt(feature.variance))
        if not per_input:
            return
        self.learned[model] = {
            name: Baseline(
                [columns[i][0] for i in sorted(columns)],
                [max(columns[i][1], 1e-9) for i in sorted(columns)],
            )
            for name, columns in per_input.items()
        }
        self.learned_items[model] = min(f.count for f in figures.inputs.values())
