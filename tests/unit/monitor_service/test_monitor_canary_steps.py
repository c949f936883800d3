"""Stepwise canary promotion as pure logic: the traffic split walks the steps while the canary
stays within the margins, the last step promotes it and clears the split, and a regression at
any step clears the split and moves the canary back."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from monitor_service.canary import CanaryAnalyzer, CanaryDecision, CanarySettings
from monitor_service.collector import VersionStats

ALIASES = {"m": {"production": 1, "canary": 2}}


class Registry:
    """Records what the analyzer asks of the registry, in order."""

    def __init__(self, split: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail_splits = 0
        self.current_split = split or {}
        self.fail_reads = False

    async def move(self, model: str, alias: str, version: int, expected: int, reason: str) -> None:
        self.calls.append(("alias", alias, version, expected))

    async def split(self, model: str, split: dict[str, int], request_id: str) -> None:
        if self.fail_splits:
            self.fail_splits -= 1
            raise RuntimeError("registry unavailable")
        self.calls.append(("split", split))
        self.current_split = split

    async def read_split(self, model: str) -> dict[str, int]:
        if self.fail_reads:
            raise RuntimeError("registry unavailable")
        return dict(self.current_split)


def analyzer(registry: Registry, decisions: list[CanaryDecision], **settings: Any) -> CanaryAnalyzer:
    async def record(decision: CanaryDecision) -> None:
        decisions.append(decision)

    values: dict[str, Any] = {"min_requests": 50, "promote_steps": [0.1, 0.5, 1.0], "step_after_s": 10.0}
    return CanaryAnalyzer(
        CanarySettings(**{**values, **settings}),
        registry.move,
        record,
        set_split=registry.split,
        get_split=registry.read_split,
    )


def figures(canary_requests: int, canary_errors: float = 0.0) -> dict[tuple[str, int], VersionStats]:
    return {
        ("m", 1): VersionStats("m", 1, request_count=500, error_rate=0.0, latency_p99_s=0.01),
        ("m", 2): VersionStats(
            "m", 2, request_count=canary_requests, error_rate=canary_errors, latency_p99_s=0.01
        ),
    }


async def test_a_healthy_canary_walks_the_steps_to_promotion() -> None:
    registry, decisions = Registry(), []
    canary = analyzer(registry, decisions)
    await canary.evaluate({}, ALIASES, now=0.0)  # the first step needs no figures
    assert registry.calls == [("split", {"production": 90, "canary": 10})]
    assert [(d.action.value, d.traffic_fraction) for d in decisions] == [("step", 0.1)]

    await canary.evaluate(figures(20), ALIASES, now=20.0)  # too few requests: no judgement
    await canary.evaluate(figures(60), ALIASES, now=21.0)  # healthy, and 10 s at the step
    assert registry.calls[-1] == ("split", {"production": 50, "canary": 50})
    await canary.evaluate(figures(200), ALIASES, now=25.0)  # not 10 s at this step yet
    assert len(registry.calls) == 2
    await canary.evaluate(figures(200), ALIASES, now=31.0)
    assert registry.calls[2:] == [("split", {}), ("alias", "production", 2, 1)]  # split first
    assert [(d.action.value, d.traffic_fraction) for d in decisions] == [
        ("step", 0.1),
        ("healthy", 0.1),
        ("step", 0.5),
        ("promote", 0.0),
    ]
    assert "step 2 of 3" in decisions[2].reason and decisions[2].canary.request_count == 60
    assert "production moves to v2" in decisions[3].reason


async def test_a_regression_at_a_step_clears_the_split_and_rolls_the_canary_back() -> None:
    registry, decisions = Registry(), []
    canary = analyzer(registry, decisions)
    await canary.evaluate({}, ALIASES, now=0.0)
    await canary.evaluate(figures(60), ALIASES, now=11.0)
    await canary.evaluate(figures(120, canary_errors=0.2), ALIASES, now=12.0)
    assert registry.calls[-2:] == [("split", {}), ("alias", "canary", 1, 2)]
    rollback = decisions[-1]
    assert rollback.action.value == "rollback" and rollback.canary.error_rate == 0.2
    assert "error rate 0.200" in rollback.reason and "traffic split cleared" in rollback.reason
    await canary.evaluate(figures(120, canary_errors=0.2), ALIASES, now=30.0)
    assert decisions[-1] is rollback  # once


async def test_a_step_that_the_registry_refuses_is_tried_again() -> None:
    registry, decisions = Registry(), []
    registry.fail_splits = 1
    canary = analyzer(registry, decisions)
    await canary.evaluate({}, ALIASES, now=0.0)
    assert registry.calls == [] and decisions == []
    await canary.evaluate({}, ALIASES, now=1.0)
    assert registry.calls == [("split", {"production": 90, "canary": 10})] and len(decisions) == 1


async def test_a_restarted_analyzer_resumes_at_the_step_the_split_shows() -> None:
    registry, decisions = Registry(split={"production": 50, "canary": 50}), []
    canary = analyzer(registry, decisions)
    await canary.evaluate({}, ALIASES, now=100.0)
    assert registry.calls == []  # the canary keeps its 50 %
    assert [(d.action.value, d.traffic_fraction) for d in decisions] == [("step", 0.5)]
    assert "resumed at step 2 of 3" in decisions[0].reason
    await canary.evaluate(figures(60), ALIASES, now=105.0)  # healthy, but 5 s at the step
    assert registry.calls == []
    await canary.evaluate(figures(120), ALIASES, now=111.0)
    assert registry.calls == [("split", {}), ("alias", "production", 2, 1)]
    assert decisions[-1].action.value == "promote"


@pytest.mark.parametrize(
    "split",
    [
        {},
        {"production": 70, "canary": 30},  # not a step: an operator's split
        {"production": 50, "shadow": 50},
        {"production": 40, "canary": 50},  # not a whole split
    ],
)
async def test_a_split_that_is_no_step_of_the_walk_starts_it_over(split: dict[str, int]) -> None:
    registry, decisions = Registry(split=split), []
    canary = analyzer(registry, decisions)
    await canary.evaluate({}, ALIASES, now=0.0)
    assert registry.calls == [("split", {"production": 90, "canary": 10})]
    assert "resumed" not in decisions[0].reason


async def test_an_unreadable_split_is_read_again_next_round_rather_than_reset() -> None:
    registry, decisions = Registry(split={"production": 50, "canary": 50}), []
    registry.fail_reads = True
    canary = analyzer(registry, decisions)
    await canary.evaluate({}, ALIASES, now=0.0)
    assert registry.calls == [] and decisions == []
    registry.fail_reads = False
    await canary.evaluate({}, ALIASES, now=1.0)
    assert registry.calls == [] and "resumed at step 2" in decisions[0].reason


@pytest.mark.parametrize("steps", [[0.1, 0.5], [0.5, 0.1, 1.0], [0.001, 1.0], [0.995, 1.0]])
def test_bad_steps_are_refused_at_start(steps: list[float]) -> None:
    with pytest.raises(ValidationError):
        CanarySettings(promote_steps=steps)


def test_steps_need_a_way_to_set_the_split() -> None:
    async def nothing(*args: Any) -> None:
        pass

    with pytest.raises(ValueError, match="needs set_split"):
        CanaryAnalyzer(CanarySettings(promote_steps=[0.5, 1.0]), nothing, nothing)
