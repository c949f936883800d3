"""Canary analysis: a walk per canary the operator started, judged against the stable version.

**The lifecycle.** A walk starts when the canary alias *moves* to a version other than the
stable alias's (SetAlias or PromoteVersion of `canary`, by whoever may move it) while the
monitor watches, or, when the monitor starts, when the newest move of the two aliases is such a
canary move by someone other than the monitor (it resumes). Nothing else starts one: a stable
alias moved away from a version that the canary still points at (an operator's rollback after
a promotion) leaves that version alone. A walk ends

- at its promotion or rollback (the monitor's own writes), or
- at any change by someone else to the canary or stable alias, or (in a stepwise walk) to the
  traffic split: an ENDED decision says what changed, and the monitor leaves the model alone
  until the canary alias moves again.

Every write of the monitor is a compare-and-set on the routing epoch the walk last saw
(`expected_epoch` of SetAlias and SetDeployment): a change that lands between the judgement
and the write fails the write with ABORTED, and the next round judges the new state. A change
of the epoch that leaves the aliases and the walk's split as they were (replicas, a hold
expiring) is taken in and the walk goes on.

**The judgement** (`monitor_service.judgement`): with `min_requests` canary requests in the
window, an exact binomial test of the error count and a Mann-Whitney U test of the latency
histograms, each with an effect-size margin, at a significance level spread over the
non-overlapping windows of the judged period (one step, or `promote_after_s`).

**Actions.** Worse: the split is cleared of the canary (if it names it), the canary alias moves
back to the stable version, a ROLLBACK decision. Healthy: one HEALTHY decision per walk; with
`promote_after_s`, promotion after that long (split cleared of the canary first, then the
stable alias moves). Stepwise (`promote_steps`): the canary gets each step's share of the
traffic that selects the stable alias through the split, for `step_after_s` each; the last
step (1.0) is the promotion.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

from monitor_service.collector import Routing, VersionStats
from monitor_service.judgement import Margins, Sample, judge

__all__ = [
    "AliasMove",
    "CanaryAction",
    "CanaryAnalyzer",
    "CanaryDecision",
    "CanaryFigures",
    "CanaryRegistry",
    "CanarySettings",
    "StaleState",
]

log = logging.getLogger(__name__)

MONITOR_REQUEST_PREFIX = "monitor-canary-"
"""Every request id of the monitor's writes starts so (the registry's history shows it)."""


class CanarySettings(BaseModel):
    """How canaries are judged (MODELYARD_MONITOR_CANARY__<FIELD>)."""

    enabled: bool = True
    """Whether the monitor analyses canaries and rolls them back."""
    canary_alias: str = "canary"
    """The alias under test."""
    stable_alias: str = "production"
    """The alias it is compared with, and rolled back to."""
    min_requests: PositiveInt = 100
    """Canary requests in the window before any judgement (and stable ones before latency is
    judged)."""
    max_error_rate_increase: NonNegativeFloat = 0.01
    """The canary's error rate may exceed the stable one's by this much (absolute, 0 to 1)
    before it counts as worse; beyond it, only when the excess is significant."""
    max_latency_ratio: PositiveFloat = 1.5
    """Allowed ratio of the canary's latency quantile to the stable one's."""
    latency_slack_s: NonNegativeFloat = 0.002
    """Added to the allowed latency, so that sub-millisecond differences never count."""
    latency_quantile: float = 0.9
    """The quantile whose ratio is the latency effect size (0.5 to 0.999)."""
    confidence: float = 0.99
    """How sure the monitor must be that the canary is worse before it rolls it back: one
    minus the false-rollback rate each test allows over one judged period."""
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

    @field_validator("latency_quantile")
    @classmethod
    def _check_quantile(cls, q: float) -> float:
        if not 0.5 <= q <= 0.999:
            raise ValueError(f"latency_quantile must be from 0.5 to 0.999, got {q}")
        return q

    @field_validator("confidence")
    @classmethod
    def _check_confidence(cls, c: float) -> float:
        if not 0.5 <= c < 1.0:
            raise ValueError(f"confidence must be from 0.5 to below 1, got {c}")
        return c

    def margins(self) -> Margins:
        return Margins(
            min_requests=self.min_requests,
            max_error_rate_increase=self.max_error_rate_increase,
            max_latency_ratio=self.max_latency_ratio,
            latency_slack_s=self.latency_slack_s,
            latency_quantile=self.latency_quantile,
        )


class CanaryAction(enum.Enum):
    HEALTHY = "healthy"
    ROLLBACK = "rollback"
    PROMOTE = "promote"
    STEP = "step"
    START = "start"
    END = "end"


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


@dataclass(frozen=True)
class AliasMove:
    """The newest move of an alias, as the registry's history records it."""

    alias: str
    to_version: int
    epoch: int
    by_monitor: bool


class StaleState(Exception):
    """A write's compare-and-set failed: the model's routing moved since it was judged."""


class CanaryRegistry(Protocol):
    """The registry as the analyzer uses it; every write is a compare-and-set on the epoch."""

    async def move_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int,
        expected_epoch: int,
        reason: str,
        request_id: str,
        promotion: bool,
    ) -> int:
        """Move an alias (a canary's promotion, or else its rollback, as the history records
        it); the new epoch. Raises StaleState on a compare-and-set failure."""
        ...

    async def set_split(
        self, model: str, split: dict[str, int], *, expected_epoch: int, request_id: str
    ) -> int:
        """Replace the deployment's traffic split ({} clears it); the new epoch. Raises
        StaleState when the epoch is not `expected_epoch`."""
        ...

    async def last_move(self, model: str, aliases: tuple[str, str]) -> AliasMove | None:
        """The newest move of either alias (None: neither ever moved)."""
        ...


@dataclass
class Walk:
    """One canary under judgement, and what the monitor expects the model's routing to be."""

    canary: int
    stable: int
    epoch: int
    """The routing epoch the walk last saw and accepted (its own writes included)."""
    split: dict[str, int]
    """The traffic split the walk expects."""
    started: float
    step: int = -1
    """Index into `promote_steps` of the step the canary is at; -1: none (yet)."""
    step_since: float = 0.0
    healthy_since: float | None = None


@dataclass
class CanaryAnalyzer:
    """Judges every canary walk after each scrape.

    Args:
        settings: The margins and the walk's shape.
        registry: Where the analyzer reads history and writes (compare-and-set).
        on_decision: Told of every decision (the monitor publishes an event and an alert).
        window_s: The collector's window, for the significance level per look.
        figures: The collector's figures over a shorter window (see the field).
    """

    settings: CanarySettings
    registry: CanaryRegistry
    on_decision: Callable[[CanaryDecision], Awaitable[None]]
    window_s: float = 60.0
    figures: Callable[[float], dict[tuple[str, int], VersionStats]] | None = None
    """Figures over the last so many seconds (the collector's): a walk is then judged on its
    current step's traffic alone. None: on the figures `evaluate` is given."""
    keep: int = 500
    decisions: deque[CanaryDecision] = field(default_factory=deque)
    walks: dict[str, Walk] = field(default_factory=dict)
    """Model -> its walk under way."""
    _seen: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    """Model -> (canary, stable) versions as the previous round saw them."""
    _written: dict[str, int] = field(default_factory=dict)
    """Model -> the epoch of the monitor's last write of a walk that ended with it: until Redis
    shows it, a round reads the state before the write and must not act on it."""

    @property
    def alpha(self) -> float:
        """The significance level of one look: 1 - confidence spread over the non-overlapping
        windows of the period one decision covers (a step, or the time to promotion)."""
        s = self.settings
        period = s.step_after_s if s.promote_steps else (s.promote_after_s or self.window_s)
        return (1.0 - s.confidence) / max(1.0, period / self.window_s)

    async def evaluate(
        self, stats: dict[tuple[str, int], VersionStats], routing: dict[str, Routing], now: float
    ) -> None:
        if not self.settings.enabled:
            return
        for model in [m for m in self.walks if m not in routing]:
            del self.walks[model]
        for model, state in sorted(routing.items()):
            try:
                await self._evaluate_model(model, state, stats, now)
            except StaleState as exc:
                log.info(
                    "canary of %s: the routing moved under a write (%s); judged again next round", model, exc
                )
            except Exception:
                log.exception("canary analysis of %s failed; trying again next round", model)

    async def _evaluate_model(
        self, model: str, state: Routing, stats: dict[tuple[str, int], VersionStats], now: float
    ) -> None:
        s = self.settings
        pointers = (state.aliases.get(s.canary_alias), state.aliases.get(s.stable_alias))
        if state.epoch < self._written.get(model, 0):
            return  # the monitor's promotion or rollback is not in Redis yet
        walk = self.walks.get(model)
        if walk is not None:
            if state.epoch < walk.epoch:
                return  # the monitor's own write is not in Redis yet
            if state.epoch > walk.epoch:
                change = self._foreign_change(walk, pointers, state.split)
                if change:
                    del self.walks[model]
                    await self._record(
                        model,
                        CanaryAction.END,
                        f"walk of canary v{walk.canary} ended: {change}; "
                        "the monitor leaves the model alone until the canary alias moves again",
                        walk,
                        stats,
                        now,
                    )
                    walk = None
                else:
                    walk.epoch = state.epoch
                    if not s.promote_steps:
                        walk.split = dict(state.split)
        if walk is None:
            started = await self._start(model, pointers, state, stats, now)
            if started is None:
                return  # undecided (history unreadable): the same question next round
            self._seen[model] = pointers
            if not started:
                return
            walk = self.walks[model]
        self._seen[model] = pointers
        await self._judge(model, walk, stats, now)

    def _foreign_change(
        self, walk: Walk, pointers: tuple[int | None, int | None], split: dict[str, int]
    ) -> str:
        """What someone other than the monitor changed that ends the walk ('' if nothing)."""
        s = self.settings
        changes = []
        for alias, was, now in (
            (s.canary_alias, walk.canary, pointers[0]),
            (s.stable_alias, walk.stable, pointers[1]),
        ):
            if now != was:
                changes.append(
                    f"{alias} moved from v{was} to " + (f"v{now}" if now is not None else "nowhere (deleted)")
                )
        if s.promote_steps and split != walk.split:
            changes.append(f"the traffic split is {_split(split)}, the walk set {_split(walk.split)}")
        return "; ".join(changes)

    async def _start(
        self,
        model: str,
        pointers: tuple[int | None, int | None],
        state: Routing,
        stats: dict[tuple[str, int], VersionStats],
        now: float,
    ) -> bool | None:
        """Start a walk if an operator started a canary; None when that cannot be told yet."""
        s = self.settings
        canary, stable = pointers
        if canary is None or stable is None or canary == stable:
            return False
        seen = self._seen.get(model)
        resumed = seen is None
        if seen is not None:
            if seen[0] == canary:
                return False  # the canary did not move: nothing was started
            why = f"{s.canary_alias} moved to v{canary}"
        else:
            # Monitor start-up: resume only a canary the newest history entry started.
            try:
                move = await self.registry.last_move(model, (s.canary_alias, s.stable_alias))
            except Exception as exc:
                log.warning("cannot read the alias history of %s (%s); asking again next round", model, exc)
                return None
            if move is None or move.alias != s.canary_alias or move.to_version != canary or move.by_monitor:
                log.info(
                    "%s: %s v%d is not judged: the newest move of its aliases did not start it as a canary",
                    model,
                    s.canary_alias,
                    canary,
                )
                return False
            why = f"{s.canary_alias} moved to v{canary} (epoch {move.epoch}) before this monitor started"
        walk = Walk(canary, stable, state.epoch, dict(state.split), now)
        self.walks[model] = walk
        if s.promote_steps and resumed and self._resume_step(walk, state.split, now):
            index = walk.step
            await self._record(
                model,
                CanaryAction.STEP,
                f"resumed at step {index + 1} of {len(s.promote_steps)}: the traffic split already "
                f"gives canary v{canary} {state.split[s.canary_alias]}% of the traffic that selects "
                f"{s.stable_alias}",
                walk,
                stats,
                now,
            )
            return True
        await self._record(
            model,
            CanaryAction.START,
            f"walk of canary v{canary} against v{stable} started: {why}",
            walk,
            stats,
            now,
        )
        return True

    def _resume_step(self, walk: Walk, split: dict[str, int], now: float) -> bool:
        """Take up the step the split already gives the canary (one of the steps before the
        last), as after a restart; its time at the step starts now."""
        s = self.settings
        if set(split) != {s.stable_alias, s.canary_alias} or sum(split.values()) != 100:
            return False
        for index, share in enumerate(s.promote_steps[:-1]):
            if round(share * 100) == split[s.canary_alias]:
                walk.step, walk.step_since = index, now
                return True
        return False

    async def _judge(
        self, model: str, walk: Walk, stats: dict[tuple[str, int], VersionStats], now: float
    ) -> None:
        s = self.settings
        if s.promote_steps and walk.step < 0:
            # Through the split is how the canary gets traffic at all: the first step comes
            # before there are figures to judge.
            await self._enter_step(model, walk, 0, stats, now)
            return
        if self.figures is not None:
            # Both sides over the same stretch of the walk: since the step began (the split,
            # hence each side's load, is what it is now), at most the collector's window.
            since = walk.step_since if walk.step >= 0 else walk.started
            stats = self.figures(min(self.window_s, max(now - since, 1e-3)))
        canary = stats.get((model, walk.canary))
        if canary is None or canary.request_count < s.min_requests:
            return
        stable = stats.get((model, walk.stable)) or VersionStats(model=model, version=walk.stable)
        verdict = judge(_sample(canary), _sample(stable), s.margins(), self.alpha)
        if verdict.worse:
            await self._roll_back(model, walk, "; ".join(verdict.problems), stats, now)
            return
        if not verdict.within:
            # Looks worse, but the sample cannot tell yet: no step forward, no verdict.
            log.info("canary %s v%d inconclusive: %s", model, walk.canary, "; ".join(verdict.problems))
            return
        if walk.healthy_since is None:
            walk.healthy_since = now
            await self._record(
                model, CanaryAction.HEALTHY, "within margins: " + "; ".join(verdict.notes), walk, stats, now
            )
        if s.promote_steps:
            if now - walk.step_since >= s.step_after_s:
                await self._enter_step(model, walk, walk.step + 1, stats, now)
        elif s.promote_after_s is not None and now - walk.healthy_since >= s.promote_after_s:
            await self._promote(model, walk, f"healthy for {now - walk.healthy_since:.0f}s", stats, now)

    async def _enter_step(
        self, model: str, walk: Walk, index: int, stats: dict[tuple[str, int], VersionStats], now: float
    ) -> None:
        """Give the canary step `index`'s share; the last step is the promotion."""
        s = self.settings
        if index == len(s.promote_steps) - 1:
            previous = s.promote_steps[walk.step]
            await self._promote(
                model, walk, f"healthy at {previous:.0%} of the traffic for {s.step_after_s:g}s", stats, now
            )
            return
        percent = round(s.promote_steps[index] * 100)
        split = {s.stable_alias: 100 - percent, s.canary_alias: percent}
        await self._write_split(model, walk, split, f"step{index}")
        previous = s.promote_steps[walk.step] if walk.step >= 0 else 0.0
        walk.step, walk.step_since = index, now
        reason = (
            f"step {index + 1} of {len(s.promote_steps)}: canary v{walk.canary} gets {percent}% of the "
            f"traffic that selects {s.stable_alias}"
        )
        if index:
            reason += f" (healthy at {previous:.0%} for {s.step_after_s:g}s)"
        await self._record(model, CanaryAction.STEP, reason, walk, stats, now)

    async def _promote(
        self, model: str, walk: Walk, why: str, stats: dict[tuple[str, int], VersionStats], now: float
    ) -> None:
        s = self.settings
        cleared = await self._clear_canary_from_split(model, walk, "promote")
        reason = f"{why}; {s.stable_alias} moves to v{walk.canary}" + (
            "; traffic split cleared" if cleared else ""
        )
        await self._move(model, walk, s.stable_alias, walk.canary, walk.stable, reason, "promote")
        del self.walks[model]
        self._seen[model] = (walk.canary, walk.canary)
        self._written[model] = walk.epoch
        await self._record(model, CanaryAction.PROMOTE, reason, walk, stats, now)

    async def _roll_back(
        self, model: str, walk: Walk, reason: str, stats: dict[tuple[str, int], VersionStats], now: float
    ) -> None:
        # The split first: from then on no request selecting the stable alias reaches the
        # canary, whatever happens to the alias move.
        s = self.settings
        if await self._clear_canary_from_split(model, walk, "rollback"):
            reason += "; traffic split cleared"
        await self._move(model, walk, s.canary_alias, walk.stable, walk.canary, reason, "rollback")
        del self.walks[model]
        self._seen[model] = (walk.stable, walk.stable)
        self._written[model] = walk.epoch
        await self._record(model, CanaryAction.ROLLBACK, reason, walk, stats, now)

    async def _clear_canary_from_split(self, model: str, walk: Walk, what: str) -> bool:
        """Give the canary's weight in the split back to the stable alias (clearing a split
        that is then all stable); False when the split does not name the canary."""
        s = self.settings
        if s.canary_alias not in walk.split:
            return False
        rest = {alias: w for alias, w in walk.split.items() if alias != s.canary_alias}
        rest[s.stable_alias] = rest.get(s.stable_alias, 0) + walk.split[s.canary_alias]
        await self._write_split(model, walk, {} if set(rest) == {s.stable_alias} else rest, what)
        return True

    async def _write_split(self, model: str, walk: Walk, split: dict[str, int], what: str) -> None:
        request_id = f"{MONITOR_REQUEST_PREFIX}{model}-v{walk.canary}-e{walk.epoch}-{what}"
        walk.epoch = await self.registry.set_split(
            model, split, expected_epoch=walk.epoch, request_id=request_id
        )
        walk.split = dict(split)

    async def _move(
        self, model: str, walk: Walk, alias: str, version: int, expected: int, reason: str, what: str
    ) -> None:
        request_id = f"{MONITOR_REQUEST_PREFIX}{model}-{alias}-v{expected}-v{version}-e{walk.epoch}-{what}"
        walk.epoch = await self.registry.move_alias(
            model,
            alias,
            version,
            expected_version=expected,
            expected_epoch=walk.epoch,
            reason=f"canary analysis: {reason}",
            request_id=request_id,
            promotion=what == "promote",
        )

    async def _record(
        self,
        model: str,
        action: CanaryAction,
        reason: str,
        walk: Walk,
        stats: dict[tuple[str, int], VersionStats],
        now: float,
    ) -> None:
        s = self.settings
        canary = stats.get((model, walk.canary)) or VersionStats(model=model, version=walk.canary)
        stable = stats.get((model, walk.stable)) or VersionStats(model=model, version=walk.stable)
        live = self.walks.get(model) is walk and walk.step >= 0
        share = s.promote_steps[walk.step] if live else 0.0
        decision = CanaryDecision(
            model, action, reason, CanaryFigures.of(canary), CanaryFigures.of(stable), now, share
        )
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


def _sample(stats: VersionStats) -> Sample:
    return Sample(int(round(stats.request_count)), int(round(stats.error_count)), stats.latency_histogram)


def _split(split: dict[str, int]) -> str:
    return (
        "{" + ", ".join(f"{alias}: {weight}" for alias, weight in sorted(split.items())) + "}"
        if split
        else "{}"
    )
