"""Shadow mismatch events: a version's shadow comparisons start (or stop) disagreeing.

The gateways compare a shadow version's answers with the served ones on every mirrored call;
the collector turns that into a mismatch rate and the largest difference over the window
(`VersionStats.shadow_*`). `ShadowWatch` turns those figures into events on a change of state
only, never once per scrape: `mismatching` when the rate rises above the threshold, `matching`
when it is back at or below it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monitor_service.collector import VersionStats

__all__ = ["ShadowWatch"]


class ShadowWatch:
    """Tracks which shadow versions disagree with the served ones.

    Usage::

        watch = ShadowWatch(threshold=0.0)
        for payload in watch.observe(collector.version_stats()):
            await events.publish(payload)

    Args:
        threshold: The mismatch rate (0 to 1) above which a version is mismatching; 0: any
            mismatch in the window.
    """

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = threshold
        self._mismatching: dict[tuple[str, int], bool] = {}

    def observe(self, stats: Mapping[tuple[str, int], VersionStats]) -> list[dict[str, Any]]:
        """The events of this round's figures (payloads for `EventBus.publish`).

        A version without comparisons in the window is forgotten: when mirroring to it starts
        again, its first state is reported afresh if it is mismatching.
        """
        events = []
        for key in [k for k in self._mismatching if not _compared(stats.get(k))]:
            del self._mismatching[key]
        for key, figures in sorted(stats.items()):
            if not figures.shadow_comparisons:
                continue
            above = figures.shadow_mismatch_rate > self.threshold
            before = self._mismatching.get(key)
            self._mismatching[key] = above
            if above != bool(before) and (above or before is not None):
                events.append(self._event(figures, "mismatching" if above else "matching"))
        return events

    def _event(self, figures: VersionStats, state: str) -> dict[str, Any]:
        diff = figures.shadow_max_abs_diff
        return {
            "type": "shadow",
            "model": figures.model,
            "version": figures.version,
            "state": state,
            "mismatch_rate": figures.shadow_mismatch_rate,
            "max_abs_diff": None if math.isnan(diff) else diff,
            "comparisons": int(figures.shadow_comparisons),
            "mismatches": int(figures.shadow_mismatches),
            "threshold": self.threshold,
        }


def _compared(figures: VersionStats | None) -> bool:
    return figures is not None and figures.shadow_comparisons > 0
