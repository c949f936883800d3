"""Canary analysis: the canary version against the stable one, and rollback when it is worse.

After every scrape, for each model whose canary alias points at another version than its
stable alias: once the canary has `min_requests` requests in the window, compare

- error rate: canary worse when `canary > stable + max_error_rate_increase`;
- p99 latency (only when the stable side has `min_requests` too): canary worse when
  `canary > stable * max_latency_ratio + latency_slack_s`.

Worse: move the canary alias back to the stable version through the registry (a
compare-and-set on the canary's version, so a human's move in between wins) and record a
ROLLBACK decision with the figures, as an event and an alert. Within the margins: record one
HEALTHY decision per canary version; with `promote_after_s` set, a canary healthy for that
long is promoted (the stable alias moves to it) and a PROMOTE decision is recorded.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, NonNegativeFloat, PositiveFloat, PositiveInt

from monitor_service.collector import VersionStats

__all__ = ["CanaryAction", "CanaryAnalyzer", "CanaryDecision", "CanaryFigures", "CanarySettings", "MoveAlias"]

log = logging.getLogger(__name__)


class CanarySettings(BaseModel):
    """How canaries are judged (MODELYARD_MONITOR_CANARY__<FIELD>)."""

    enabled: bool = True
    """Whether the monitor analyses canaries and rolls them back."""
    canary_alias: str = "canary"
    """The alias under test."""
    stable_alias: str = "production"
    """The alias it is compared with, and rolled back to."""
    min_requests: PositiveInt = 100
    """Canary requests in the window before any decision."""
    max_error_rate_increase: NonNegativeFloat = 0.05
    """Allowed excess of the canary's error rate over the stable one (absolute, 0 to 1)."""
    max_latency_ratio: PositiveFloat = 1.5
    """Allowed ratio of the canary's p99 to the stable p99."""
    latency_slack_s: NonNegativeFloat = 0.005
    """Added to the allowed p99, so that sub-millisecond noise never rolls a canary back."""
    promote_after_s: PositiveFloat | None = None
    """Promote a canary that stayed healthy this long; unset: never promote automatically."""


class CanaryAction(enum.Enum):
    HEALTHY = "healthy"
    ROLLBACK = "rollback"
    PROMOTE = "promote"


@dataclass(frozen=True)
class CanaryFigures:
    """One side of the comparison."""

    version: int
    request_count: int
    error_rate: float
    latency_p99_s: float

    @classmethod
    def of(cls, stats: VersionStats) -> CanaryFigures:
        return cls(stats.version, int(stats.request_count), stats.error_rate, stats.latency_p99_s)

    def describe(self) -> str:
        p99 = "n/a" if math.isnan(self.latency_p99_s) else f"{self.latency_p99_s * 1000:.1f}ms"
        return f"v{self.version}: {self.request_count} requests, error rate {self.error_rate:.3f}, p99 {p99}"


@dataclass(frozen=True)
class CanaryDecision:
    """A recorded decision and the figures behind it."""

    model: str
    action: CanaryAction
    reason: str
    canary: CanaryFigures
    stable: CanaryFigures
    time: float

    def as_event(self) -> dict[str, object]:
        return {
            "type": "canary",
            "model": self.model,
            "action": self.action.value,
            "reason": self.reason,
            "canary": vars(self.canary),
            "stable": vars(self.stable),
        }


MoveAlias = Callable[[str, str, int, int, str], Awaitable[None]]
"""(model, alias, version, expected_version, reason): moves an alias through the registry."""


@dataclass
class CanaryAnalyzer:
    """Judges every canary after each scrape.

    Args:
        settings: The margins.
        move_alias: Moves an alias through the registry (compare-and-set).
        on_decision: Told of every decision (the monitor publishes an event and an alert).
    """

    settings: CanarySettings
    move_alias: MoveAlias
    on_decision: Callable[[CanaryDecision], Awaitable[None]]
    keep: int = 500
    decisions: deque[CanaryDecision] = field(default_factory=deque)
    _healthy_since: dict[tuple[str, int], float] = field(default_factory=dict)
    _rolled_back: set[tuple[str, int]] = field(default_factory=set)

    async def evaluate(
        self, stats: dict[tuple[str, int], VersionStats], aliases: dict[str, dict[str, int]], now: float
    ) -> None:
        s = self.settings
        if not s.enabled:
            return
        for model, pointers in sorted(aliases.items()):
            canary_version = pointers.get(s.canary_alias)
            stable_version = pointers.get(s.stable_alias)
            if canary_version is None or stable_version is None or canary_version == stable_version:
                continue
            key = (model, canary_version)
            if key in self._rolled_back:
                continue
            canary = stats.get(key)
            stable = stats.get((model, stable_version))
            if canary is None or canary.request_count < s.min_requests:
                continue
            stable = stable or VersionStats(model=model, version=stable_version)
            figures = (CanaryFigures.of(canary), CanaryFigures.of(stable))
            problems = self._problems(canary, stable)
            if problems:
                reason = "; ".join(problems)
                await self._roll_back(model, canary_version, stable_version, reason, figures, now)
                continue
            if key not in self._healthy_since:
                self._healthy_since[key] = now
                reason = (f"within margins: error rate {canary.error_rate:.3f} <= "
                          f"{stable.error_rate:.3f} + {s.max_error_rate_increase:g}")
                await self._record(CanaryDecision(model, CanaryAction.HEALTHY, reason, *figures, now))
            elif s.promote_after_s is not None and now - self._healthy_since[key] >= s.promote_after_s:
                healthy_s = now - self._healthy_since[key]
                reason = f"healthy for {healthy_s:.0f}s; {s.stable_alias} moves to v{canary_version}"
                await self.move_alias(
                    model, s.stable_alias, canary_version, stable_version, f"canary analysis: {reason}"
                )
                del self._healthy_since[key]
                await self._record(CanaryDecision(model, CanaryAction.PROMOTE, reason, *figures, now))

    def _problems(self, canary: VersionStats, stable: VersionStats) -> list[str]:
        s = self.settings
        problems = []
        if canary.error_rate > stable.error_rate + s.max_error_rate_increase:
            problems.append(
                f"error rate {canary.error_rate:.3f} > stable {stable.error_rate:.3f} + "
                f"{s.max_error_rate_increase:g}"
            )
        if stable.request_count >= s.min_requests and not math.isnan(stable.latency_p99_s):
            allowed = stable.latency_p99_s * s.max_latency_ratio + s.latency_slack_s
            if canary.latency_p99_s > allowed:
                problems.append(
                    f"p99 {canary.latency_p99_s * 1000:.1f}ms > allowed {allowed * 1000:.1f}ms "
                    f"(stable {stable.latency_p99_s * 1000:.1f}ms x {s.max_latency_ratio:g})"
                )
        return problems

    async def _roll_back(
        self, model: str, canary_version: int, stable_version: int, reason: str,
        figures: tuple[CanaryFigures, CanaryFigures], now: float,
    ) -> None:
        s = self.settings
        try:
            await self.move_alias(
                model, s.canary_alias, stable_version, canary_version, f"canary analysis: {reason}"
            )
        except Exception:
            # The next scrape tries again; the decision is recorded once it took effect.
            log.exception("rolling back %s %s v%d failed", model, s.canary_alias, canary_version)
            return
        self._rolled_back.add((model, canary_version))
        self._healthy_since.pop((model, canary_version), None)
        await self._record(CanaryDecision(model, CanaryAction.ROLLBACK, reason, *figures, now))

    async def _record(self, decision: CanaryDecision) -> None:
        log.warning("canary %s %s: %s [canary %s | stable %s]", decision.model, decision.action.value,
                    decision.reason, decision.canary.describe(), decision.stable.describe())
        self.decisions.appendleft(decision)
        while len(self.decisions) > self.keep:
            self.decisions.pop()
        await self.on_decision(decision)
