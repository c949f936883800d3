"""Input drift: the window's input statistics of each version against its baseline.

Model servers export, for a sample of requests, the count, sum and sum of squares of every
input feature, and for versions registered with a binned baseline the items per bin
(`model_server/stats.py`); the collector turns window deltas into a mean and a variance per
feature, and counts per bin. Two scores per version:

- `input_drift`: the largest standardised mean shift over its features,
  `|mean_window - mean_baseline| / std_baseline`: 0 for identical inputs, about 1 when a
  feature moved by one baseline standard deviation.
- `input_psi`: the largest population stability index over its features, from the bin counts
  against the baseline's bin fractions (`modelyard.baseline.population_stability_index`):
  0 for identical distributions, 0.1 a moderate shift, 0.25 a large one.

The baseline of a version comes, first found first used, from the rule file (`baselines:`,
per model: mean and std), from the registry (recorded with the version at registration:
mean, std and bins), or is learned from the first `learn_items` sampled items the monitor
sees for the model and then frozen (mean and std). The PSI needs bins, so only a registry
baseline gives one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from modelyard.baseline import population_stability_index
from modelyard.v1 import registry_pb2
from monitor_service.collector import VersionStats
from monitor_service.rules import Baseline

__all__ = ["DriftDetector", "RegistryBaseline"]


@dataclass(frozen=True)
class RegistryBaseline:
    """One input's baseline as the registry recorded it with a version."""

    reference: Baseline
    """Mean and standard deviation per feature (std 0: a constant feature, no mean shift)."""
    fractions: list[list[float]]
    """Per feature, the fraction of the baseline's items in each bin (empty: no bins)."""

    @classmethod
    def of(cls, message: registry_pb2.InputBaseline) -> RegistryBaseline:
        return cls(
            Baseline([f.mean for f in message.features], [f.std for f in message.features]),
            [list(f.bin_fractions) for f in message.features],
        )


@dataclass
class DriftDetector:
    """Computes `input_drift` and `input_psi` for every version's figures.

    Args:
        baselines: model -> input -> baseline, from the rule file (they win).
        learn_items: Items to learn a baseline from when nothing else gives one for a model.
        min_items: Fewer sampled items (or binned items) in the window give no score (0).
    """

    baselines: dict[str, dict[str, Baseline]] = field(default_factory=dict)
    learn_items: int = 1000
    min_items: int = 50
    learned: dict[str, dict[str, Baseline]] = field(default_factory=dict)
    registry: dict[tuple[str, int], dict[str, RegistryBaseline]] = field(default_factory=dict)
    """(model, version) -> input -> baseline recorded in the registry; set by the monitor."""

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

    def apply(self, stats: dict[tuple[str, int], VersionStats]) -> None:
        """Set `input_drift` and `input_psi` on every version (and learn baselines still missing)."""
        for (model, version), figures in stats.items():
            if not figures.inputs:
                continue
            figures.input_psi = self._psi(self.registry.get((model, version)), figures)
            reference = self.baseline(model, version)
            if reference is None:
                self._learn(model, figures)
                continue
            score = 0.0
            for key, feature in figures.inputs.items():
                if feature.count < self.min_items:
                    continue
                name, _, index = key.rpartition("/")
                base = reference.get(name)
                column = int(index)
                if base is None or column >= len(base.mean) or base.std[column] <= 0:
                    continue
                shift = abs(feature.mean - base.mean[column]) / base.std[column]
                score = max(score, shift)
            figures.input_drift = score

    def _psi(self, recorded: dict[str, RegistryBaseline] | None, figures: VersionStats) -> float:
        if recorded is None:
            return 0.0
        score = 0.0
        for key, counts in figures.input_bins.items():
            if sum(counts) < self.min_items:
                continue
            name, _, index = key.rpartition("/")
            base = recorded.get(name)
            column = int(index)
            if base is None or column >= len(base.fractions) or not base.fractions[column]:
                continue
            expected = base.fractions[column]
            observed = (counts + [0.0] * len(expected))[: len(expected)]
            value = population_stability_index(expected, observed)
            if not math.isnan(value):
                score = max(score, value)
        return score

    def _learn(self, model: str, figures: VersionStats) -> None:
        per_input: dict[str, dict[int, tuple[float, float]]] = {}
        for key, feature in figures.inputs.items():
            if feature.count < self.learn_items:
                return
            name, _, index = key.rpartition("/")
            per_input.setdefault(name, {})[int(index)] = (feature.mean, math.sqrt(feature.variance))
        self.learned[model] = {
            name: Baseline(
                [columns[i][0] for i in sorted(columns)],
                [max(columns[i][1], 1e-9) for i in sorted(columns)],
            )
            for name, columns in per_input.items()
        }
