"""Version selection by weight: the traffic split between aliases of a model's deployment.

Requests that select the default alias are spread over the aliases of
`Deployment.traffic_split`. Without a routing key the spread is smooth weighted round robin
(nginx's algorithm): exact proportions over any window, no randomness to drift. With a key it
is a hash of the key onto the weights, so a key keeps its alias while the weights are stable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

__all__ = ["TrafficSplitter", "key_point", "key_score"]

_SCALE = float(1 << 64)


def key_point(key: str, salt: str = "") -> float:
    """A stable point in [0, 1) for a key (the same in every process and release)."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / _SCALE


def key_score(key: str, member: str) -> int:
    """Rendezvous (highest random weight) score of `member` for `key`."""
    digest = hashlib.blake2b(f"{key}\x00{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Wheel:
    """Smooth weighted round robin over fixed weights."""

    __slots__ = ("names", "weights", "total", "current")

    def __init__(self, weights: Mapping[str, int]) -> None:
        # Sorted so that every gateway walks the same sequence for the same weights.
        self.names = sorted(weights)
        self.weights = [weights[n] for n in self.names]
        self.total = sum(self.weights)
        self.current = [0] * len(self.names)

    def next(self) -> str:
        best = 0
        current, weights = self.current, self.weights
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return self.names[best]

    def by_point(self, point: float) -> str:
        target = point * self.total
        for name, weight in zip(self.names, self.weights, strict=True):
            if target < weight:
                return name
            target -= weight
        return self.names[-1]


class TrafficSplitter:
    """Picks the alias for a request that selected the default alias.

    Usage::

        splitter = TrafficSplitter()
        alias = splitter.choose("demo", {"production": 90, "canary": 10}, routing_key="")
    """

    def __init__(self) -> None:
        self._wheels: dict[str, tuple[tuple[tuple[str, int], ...], _Wheel]] = {}

    def choose(self, model: str, split: Mapping[str, int], routing_key: str = "") -> str | None:
        """The alias to use, or None when the split is empty (use the default alias).

        Args:
            model: The model (each model has its own round-robin state).
            split: Weights per alias; aliases with weight 0 get nothing.
            routing_key: When set, the choice is a pure function of the key and the weights.
        """
        if not split:
            return None
        frozen = tuple(sorted((a, w) for a, w in split.items() if w > 0))
        if not frozen:
            return None
        entry = self._wheels.get(model)
        if entry is None or entry[0] != frozen:
            entry = self._wheels[model] = (frozen, _Wheel(dict(frozen)))
        wheel = entry[1]
        if routing_key:
            return wheel.by_point(key_point(routing_key, model))
        return wheel.next()
