"""Grants: what a key may do, as verb × model pattern.

A grant is `verb:pattern` for the verbs that act on a model (`predict:fraud-*`,
`registry.write:demo`) or a bare verb for the cluster-wide ones (`monitor.read`, `admin`).
A pattern is a model name in which `*` stands for any run of characters; `*` alone is every
model. `admin` implies every other verb on every model, and is the only grant that manages
keys.

Pure logic: no grpc, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "ADMIN",
    "GLOBAL_VERBS",
    "MODEL_VERBS",
    "Grant",
    "Grants",
    "InvalidGrant",
]

MODEL_VERBS = ("predict", "metadata", "registry.read", "registry.write", "alias.move", "deploy")
"""Verbs that act on one model, granted per model pattern."""
GLOBAL_VERBS = ("monitor.read", "audit.read", "admin")
"""Verbs that act on the whole cluster."""
ADMIN = "admin"

_PATTERN = re.compile(r"[a-z0-9*][a-z0-9_*-]{0,62}")


class InvalidGrant(ValueError):
    """A grant string that does not parse; the message says what a good one looks like."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One verb on the models matching a pattern (`*` for cluster-wide verbs)."""

    verb: str
    pattern: str = "*"

    @classmethod
    def parse(cls, text: str) -> Grant:
        """`predict:fraud-*`, `metadata:*`, `monitor.read`, `admin`."""
        verb, sep, pattern = text.strip().partition(":")
        if verb in GLOBAL_VERBS:
            if sep and pattern not in ("", "*"):
                raise InvalidGrant(f"{verb!r} is cluster-wide and takes no model pattern (got {text[:80]!r})")
            return cls(verb)
        if verb not in MODEL_VERBS:
            known = ", ".join((*MODEL_VERBS, *GLOBAL_VERBS))
            raise InvalidGrant(f"unknown verb {verb[:40]!r} in grant {text[:80]!r}; the verbs are {known}")
        if not sep or _PATTERN.fullmatch(pattern) is None:
            raise InvalidGrant(
                f"grant {text[:80]!r} needs a model pattern after the colon: lower-case letters, digits,"
                f" '-', '_' and '*' (for example {verb}:fraud-* or {verb}:*)"
            )
        return cls(verb, pattern)

    def __str__(self) -> str:
        return self.verb if self.verb in GLOBAL_VERBS else f"{self.verb}:{self.pattern}"

    def matches(self, model: str) -> bool:
        return _compile(self.pattern).fullmatch(model) is not None


_COMPILED: dict[str, re.Pattern[str]] = {}


def _compile(pattern: str) -> re.Pattern[str]:
    compiled = _COMPILED.get(pattern)
    if compiled is None:
        compiled = re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
        if len(_COMPILED) < 4096:
            _COMPILED[pattern] = compiled
    return compiled


class Grants:
    """A key's grants, with the answers to `allows` remembered (a key asks the same few
    questions on every call)."""

    __slots__ = ("grants", "_admin", "_by_verb", "_answers")

    def __init__(self, grants: Iterable[Grant]) -> None:
        self.grants = tuple(dict.fromkeys(grants))
        self._admin = any(g.verb == ADMIN for g in self.grants)
        self._by_verb: dict[str, tuple[Grant, ...]] = {}
        for grant in self.grants:
            self._by_verb[grant.verb] = (*self._by_verb.get(grant.verb, ()), grant)
        self._answers: dict[tuple[str, str], bool] = {}

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Grants:
        return cls(Grant.parse(text) for text in texts)

    def __str__(self) -> str:
        return " ".join(str(g) for g in self.grants)

    def strings(self) -> list[str]:
        return [str(g) for g in self.grants]

    def allows(self, verb: str, model: str = "") -> bool:
        """Whether the grants allow `verb` on `model` ("" for a cluster-wide verb or a call
        that names no model: then any grant of the verb is enough)."""
        key = (verb, model)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._admin or any(
                g.pattern == "*" or not model or g.matches(model) for g in self._by_verb.get(verb, ())
            )
            if len(self._answers) < 1024:
                self._answers[key] = answer
        return answer

    def sees(self, verb: str, model: str) -> bool:
        """Whether a listing answered under `verb` may show `model` (`allows` with a name)."""
        return self.allows(verb, model) if model else False
