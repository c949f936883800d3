"""Passive health on a fake clock: consecutive failures eject; a replica whose calls stall
(nothing it was sent ends) is ejected at once, while a busy one that still answers is not."""

from __future__ import annotations

from gateway.outlier import PassiveHealth
from gateway.routing_table import Replica


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _pair() -> tuple[PassiveHealth, Clock, Replica, Replica]:
    clock = Clock()
    return (
        PassiveHealth(threshold=3, eject_s=5.0, stall_s=0.5, clock=clock),
        clock,
        Replica("a", "a:1"),
        Replica("b", "b:1"),
    )


def test_consecutive_failures_eject_and_a_success_clears() -> None:
    health, clock, a, b = _pair()
    for _ in range(3):
        health.failed(a)
    assert health.usable([a, b]) == [b]
    clock.now += 6.0
    assert health.usable([a, b]) == [a, b]  # probed again after eject_s
    health.succeeded(a)
    assert a.failures == 0 and a.ejected_until == 0.0


def test_a_frozen_replica_is_ejected_without_waiting_for_its_calls() -> None:
    health, clock, a, b = _pair()
    ejected: list[str] = []
    health = PassiveHealth(stall_s=0.5, clock=clock, on_eject=lambda r: ejected.append(r.server_id))
    for replica in (a, b):  # both answer in 10 ms
        token = health.started(replica)
        clock.now += 0.01
        health.ended(replica, token, ok=True)
    health.started(a)  # a freezes with this call on it
    clock.now += 0.4
    assert health.usable([a, b]) == [a, b]  # not yet past the limit
    clock.now += 0.2
    assert health.usable([a, b]) == [b] and ejected == ["a"]


def test_a_busy_replica_that_still_answers_is_not_a_stall() -> None:
    health, clock, a, b = _pair()
    first = health.started(a)
    for _ in range(10):  # a long call stays in flight while others keep ending
        clock.now += 0.2
        token = health.started(a)
        clock.now += 0.05
        health.ended(a, token, ok=True)
        assert health.usable([a, b]) == [a, b]
    health.ended(a, first, ok=True)
    assert not a.started


def test_the_limit_follows_the_typical_latency_when_it_is_long() -> None:
    health, clock, a, b = _pair()
    for replica in (a, b):  # both take 200 ms: the limit is 8 x 200 ms, not 0.5 s
        token = health.started(replica)
        clock.now += 0.2
        health.ended(replica, token, ok=True)
    health.started(a)
    clock.now += 1.0
    assert health.usable([a, b]) == [a, b]
    clock.now += 1.0
    assert health.usable([a, b]) == [b]


def test_when_every_replica_is_ejected_all_are_used() -> None:
    health, _, a, b = _pair()
    for replica in (a, b):
        for _ in range(3):
            health.failed(replica)
    assert health.usable([a, b]) == [a, b]
