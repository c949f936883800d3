"""Replica choice strategies. The gateway takes one in its constructor."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from gateway.routing_table import Replica

__all__ = ["ReplicaPicker", "LeastOutstanding"]


class ReplicaPicker(Protocol):
    def choose(self, replicas: Sequence[Replica], exclude: Replica | None = None) -> Replica | None:
        """Pick one replica, never `exclude`; None when no other replica is left."""
        ...


class LeastOutstanding:
    """Power of two choices on in-flight calls: sample two replicas, take the less busy one.

    Near the balance of a full scan at O(1), and without the herd a global minimum causes
    when many gateways see the same numbers.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, replicas: Sequence[Replica], exclude: Replica | None = None) -> Replica | None:
        candidates = [r for r in replicas if r is not exclude] if exclude is not None else replicas
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        ra, rb = candidates[a], candidates[b]
        return ra if ra.outstanding <= rb.outstanding else rb
