"""Input drift: the window's input statistics of each version against the model's baseline.

Model servers export, for a sample of requests, the count, sum and sum of squares of every
input feature (`model_server/stats.py`); the collector turns window deltas into a mean and a
variance per feature. The drift score of a version is the largest standardised mean shift
over its features, `|mean_window - mean_baseline| / std_baseline`: 0 for identical inputs,
about 1 when a feature moved by one baseline standard deviation.

The baseline of a model comes from the rule file (`baselines:`, e.g. written from the
training set at registration) or, failing that, is learned from the first
`learn_items` sampled items the monitor sees for the model, then frozen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from monitor_service.collector import VersionStats
from monitor_service.rules import Baseline

__all__ = ["DriftDetector"]


@dataclass
class DriftDetector:
    """Computes `input_drift` for every version's figures.

    Args:
        baselines: model -> input -> baseline, from the rule file.
        learn_items: Items to learn a baseline from when the file has none for a model.
        min_items: Fewer sampled items in the window give no score (0).
    """

    baselines: dict[str, dict[str, Baseline]] = field(default_factory=dict)
    learn_items: int = 1000
    min_items: int = 50
    learned: dict[str, dict[str, Baseline]] = field(default_factory=dict)

    def baseline(self, model: str) -> dict[str, Baseline] | None:
        return self.baselines.get(model) or self.learned.get(model)

    def apply(self, stats: dict[tuple[str, int], VersionStats]) -> None:
        """Set `input_drift` on every version (and learn baselines that are still missing)."""
        for (model, _version), figures in stats.items():
            if not figures.inputs:
                continue
            reference = self.baseline(model)
            if reference is None:
                self._learn(model, figures)
                continue
            score = 0.0
            for key, feature in figures.inputs.items():
                if feature.count < self.min_items:
                    continue
                name, _, index = key.rpartition("/")
                base = reference.get(name)
                if base is None or int(index) >= len(base.mean):
                    continue
                shift = abs(feature.mean - base.mean[int(index)]) / base.std[int(index)]
                score = max(score, shift)
            figures.input_drift = score

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
