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

Stepwise promotion (`promote_steps`, e.g. [0.1, 0.25, 0.5, 1.0]): as soon as a canary appears
it gets the first step's share of the traffic that selects the stable alias, through the
deployment's traffic split ({stable: 90, canary: 10}); after `step_after_s` at a step with
the canary within the margins (and `min_requests` in the window) it gets the next step's
share. The final step (1.0) is the promotion: the split is cleared and the stable alias moves
to the canary. Every step is a STEP decision with the figures. A regression at any step is a
rollback: the split is cleared first, then the canary alias moves back.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pydantic import BaseModel, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

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
    """Promote a canary that stayed healthy this long; unset: never promote automatically.
    Ignored when `promote_steps` is set."""
    promote_steps: list[float] = []
    """Stepwise promotion: the canary's share (0 to 1) of the traffic that selects the stable
    alias, step by step, ascending, the last 1.0 (the promotion itself), e.g. [0.1, 0.25, 0.5,
    1.0]. Applied through the deployment's traffic split, whole per cents. Empty: no steps."""
    step_after_s: PositiveFloat = 60.0
    """How long a canary stays within the margins at one step before it gets the next."""

    @field_validator("promote_steps")
    @classmethod
    def _check_steps(cls, steps: list[float]) -> list[float]:
        if not steps:
            return steps
        if steps[-1] != 1.0:
            raise ValueError("the last of promote_steps must be 1.0 (the promotion)")
        if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError("promote_steps must be strictly ascending")
        for step in steps[:-1]:
            if not 1 <= round(step * 100) <= 99:
                raise ValueError(f"step {step} is not a share from 0.01 to 0.99 of the traffic")
        return steps


class CanaryAction(enum.Enum):
    HEALTHY = "healthy"
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    STEP = "step"


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
    traffic_fraction: float = 0.0
    """The canary's share of the split traffic after the decision (stepwise promotion)."""

    def as_event(self) -> dict[str, object]:
        return {
            "type": "canary",
            "model": self.model,
            "action": self.action.value,
            "reason": self.reason,
            "canary": vars(self.canary),
            "stable": vars(self.stable),
            "traffic_fraction": self.traffic_fraction,
        }


MoveAlias = Callable[[str, str, int, int, str], Awaitable[None]]
"""(model, alias, version, expected_version, reason): moves an alias through the registry."""

SetSplit = Callable[[str, dict[str, int], str], Awaitable[None]]
"""(model, traffic_split, request_id): replaces the traffic split of the model's deployment
through the registry; {} clears it."""

GetSplit = Callable[[str], Awaitable[dict[str, int]]]
"""(model): the traffic split of the model's deployment, read from the registry."""


@dataclass
class CanaryAnalyzer:
    """Judges every canary after each scrape.

    Args:
        settings: The margins.
        move_alias: Moves an alias through the registry (compare-and-set).
        on_decision: Told of every decision (the monitor publishes an event and an alert).
        set_split: Replaces a model's traffic split through the registry (stepwise promotion).
        get_split: Reads a model's traffic split from the registry: a monitor that restarts
            mid-walk resumes at the step the split shows instead of starting over.
    """

    settings: CanarySettings
    move_alias: MoveAlias
    on_decision: Callable[[CanaryDecision], Awaitable[None]]
    set_split: SetSplit | None = None
    get_split: GetSplit | None = None
    keep: int = 500
    decisions: deque[CanaryDecision] = field(default_factory=deque)
    _healthy_since: dict[tuple[str, int], float] = field(default_factory=dict)
    _rolled_back: set[tuple[str, int]] = field(default_factory=set)
    _steps: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)
    """(model, canary version) -> (index of the step it is at, when it got there)."""

    def __post_init__(self) -> None:
        if self.settings.promote_steps and self.set_split is None:
            raise ValueError("stepwise promotion (promote_steps) needs set_split")

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
            stable = stable or VersionStats(model=model, version=stable_version)
            if s.promote_steps and key not in self._steps:
                # Through the split is how the canary gets traffic at all: the first step starts
                # as soon as the canary appears, before there are figures to judge, unless the
                # split shows a walk already under way (this monitor restarted).
                empty = canary or VersionStats(model=model, version=canary_version)
                figures = (CanaryFigures.of(empty), CanaryFigures.of(stable))
                resumed = await self._resume_step(model, canary_version, figures, now)
                if resumed is False:
                    await self._enter_step(model, canary_version, stable_version, 0, figures, now)
                continue
            if canary is None or canary.request_count < s.min_requests:
                continue
            figures = (CanaryFigures.of(canary), CanaryFigures.of(stable))
            problems = self._problems(canary, stable)
            if problems:
                reason = "; ".join(problems)
                await self._roll_back(model, canary_version, stable_version, reason, figures, now)
                continue
            if key not in self._healthy_since:
                self._healthy_since[key] = now
                reason = (
                    f"within margins: error rate {canary.error_rate:.3f} <= "
                    f"{stable.error_rate:.3f} + {s.max_error_rate_increase:g}"
                )
                await self._record(
                    CanaryDecision(model, CanaryAction.HEALTHY, reason, *figures, now, self._fraction(key))
                )
            if s.promote_steps:
                index, since = self._steps[key]
                if now - since >= s.step_after_s:
                    await self._enter_step(model, canary_version, stable_version, index + 1, figures, now)
            elif s.promote_after_s is not None and now - self._healthy_since[key] >= s.promote_after_s:
                healthy_s = now - self._healthy_since[key]
                reason = f"healthy for {healthy_s:.0f}s; {s.stable_alias} moves to v{canary_version}"
                await self.move_alias(
                    model, s.stable_alias, canary_version, stable_version, f"canary analysis: {reason}"
                )
                del self._healthy_since[key]
                await self._record(CanaryDecision(model, CanaryAction.PROMOTE, reason, *figures, now))

    def _fraction(self, key: tuple[str, int]) -> float:
        """The canary's share of the split traffic now (0 without steps)."""
        at = self._steps.get(key)
        return self.settings.promote_steps[at[0]] if at is not None else 0.0

    async def _resume_step(
        self, model: str, canary_version: int, figures: tuple[CanaryFigures, CanaryFigures], now: float
    ) -> bool | None:
        """Take up the step the deployment's split already gives the canary (exactly one of
        the steps before the last), as after a restart; its time at the step starts now.

        Returns:
            True when resumed, False when the walk starts at the first step, None when the
            split could not be read (the next round asks again: a registry blip must not cut
            a canary at 50 % back to the first step).
        """
        s = self.settings
        if self.get_split is None:
            return False
        try:
            split = await self.get_split(model)
        except Exception:
            log.exception("reading the traffic split of %s failed; trying again next round", model)
            return None
        if set(split) != {s.stable_alias, s.canary_alias} or sum(split.values()) != 100:
            return False
        for index, share in enumerate(s.promote_steps[:-1]):
            if round(share * 100) == split[s.canary_alias]:
                self._steps[(model, canary_version)] = (index, now)
                reason = (
                    f"resumed at step {index + 1} of {len(s.promote_steps)}: the traffic split "
                    f"already gives canary v{canary_version} {split[s.canary_alias]}% of the "
                    f"traffic that selects {s.stable_alias}"
                )
                await self._record(CanaryDecision(model, CanaryAction.STEP, reason, *figures, now, share))
                return True
        return False

    async def _enter_step(
        self,
        model: str,
        canary_version: int,
        stable_version: int,
        index: int,
        figures: tuple[CanaryFigures, CanaryFigures],
        now: float,
    ) -> None:
        """Give the canary step `index`'s share; the last step is the promotion."""
        s = self.settings
        assert self.set_split is not None  # checked in __post_init__
        key = (model, canary_version)
        share = s.promote_steps[index]
        previous = self._fraction(key)
        request_id = f"monitor-canary-{model}-v{canary_version}-step{index}"
        try:
            if index == len(s.promote_steps) - 1:
                # Split first, alias second: if the move fails, every request goes to the
                # stable version meanwhile, and the next round tries both again.
                await self.set_split(model, {}, request_id)
                reason = (
                    f"healthy at {previous:.0%} of the traffic for {s.step_after_s:g}s; "
                    f"{s.stable_alias} moves to v{canary_version}, traffic split cleared"
                )
                await self.move_alias(
                    model, s.stable_alias, canary_version, stable_version, f"canary analysis: {reason}"
                )
                action, share = CanaryAction.PROMOTE, 0.0
            else:
                percent = round(share * 100)
                split = {s.stable_alias: 100 - percent, s.canary_alias: percent}
                await self.set_split(model, split, request_id)
                reason = (
                    f"step {index + 1} of {len(s.promote_steps)}: canary v{canary_version} gets "
                    f"{percent}% of the traffic that selects {s.stable_alias}"
                )
                if index:
                    reason += f" (healthy at {previous:.0%} for {s.step_after_s:g}s)"
                action = CanaryAction.STEP
        except Exception:
            log.exception("stepping %s canary v%d to step %d failed", model, canary_version, index + 1)
            return
        if action is CanaryAction.PROMOTE:
            self._steps.pop(key, None)
            self._healthy_since.pop(key, None)
        else:
            self._steps[key] = (index, now)
        await self._record(CanaryDecision(model, action, reason, *figures, now, share))

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
        self,
        model: str,
        canary_version: int,
        stable_version: int,
        reason: str,
        figures: tuple[CanaryFigures, CanaryFigures],
        now: float,
    ) -> None:
        s = self.settings
        try:
            if (model, canary_version) in self._steps:
                assert self.set_split is not None
                # The split first: from then on no request selecting the stable alias reaches
                # the canary, whatever happens to the alias move.
                await self.set_split(model, {}, f"monitor-canary-{model}-v{canary_version}-rollback")
            await self.move_alias(
                model, s.canary_alias, stable_version, canary_version, f"canary analysis: {reason}"
            )
        except Exception:
            # The next scrape tries again; the decision is recorded once it took effect.
            log.exception("rolling back %s %s v%d failed", model, s.canary_alias, canary_version)
            return
        self._rolled_back.add((model, canary_version))
        self._healthy_since.pop((model, canary_version), None)
        if self._steps.pop((model, canary_version), None) is not None:
            reason += "; traffic split cleared"
        await self._record(CanaryDecision(model, CanaryAction.ROLLBACK, reason, *figures, now))

    async def _record(self, decision: CanaryDecision) -> None:
        log.warning(
            "canary %s %s: %s [canary %s | stable %s]",
            decision.model,
            decision.action.value,
            decision.reason,
            decision.canary.describe(),
            decision.stable.describe(),
        )
        self.decisions.appendleft(decision)
        while len(self.decisions) > self.keep:
            self.decisions.pop()
        await self.on_decision(decision)
