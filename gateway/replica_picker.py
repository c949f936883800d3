"""Replica choice strategies. The router takes them in its constructor."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from gateway.routing_table import Replica
from gateway.traffic import key_score

__all__ = ["ReplicaPicker", "LeastOutstanding", "ConsistentHash"]


class ReplicaPicker(Protocol):
    def choose(
        self, replicas: Sequence[Replica], exclude: Replica | None = None, key: str = ""
    ) -> Replica | None:
        """Pick one replica, never `exclude`; None when no other replica is left. `key` is the
        caller's routing key (may be empty)."""
        ...


class LeastOutstanding:
    """Power of two choices on in-flight calls: sample two replicas, take the less busy one.

    Near the balance of a full scan at O(1), and without the herd a global minimum causes
    when many gateways see the same numbers.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(
        self, replicas: Sequence[Replica], exclude: Replica | None = None, key: str = ""
    ) -> Replica | None:
        candidates = [r for r in replicas if r is not exclude] if exclude is not None else replicas
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(range(len(candidates)), 2)
        ra, rb = candidates[a], candidates[b]
        return ra if ra.outstanding <= rb.outstanding else rb


class ConsistentHash:
    """Sticky choice by routing key: rendezvous (highest random weight) hashing of the key
    over the replicas' server ids.

    A key keeps its replica while the set is stable; when a replica leaves, only its keys
    move (each to its next-highest replica), and when one joins it takes about 1/n of them.
    Keyless calls fall back to `fallback`.
    """

    def __init__(self, fallback: ReplicaPicker | None = None) -> None:
        self._fallback = fallback or LeastOutstanding()

    def choose(
        self, replicas: Sequence[Replica], exclude: Replica | None = None, key: str = ""
    ) -> Replica | None:
        if not key:
            return self._fallback.choose(replicas, exclude)
        best: Replica | None = None
        best_score = -1
        for replica in replicas:
            if replica is exclude:
                continue
            score = key_score(key, replica.server_id)
            if score > best_score:
                best, best_score = replica, score
        return best
