"""Load stages: how many users, for how long, written `DURATION:USERS@SPAWN_RATE,...`."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Stage", "parse_stages", "format_stages", "parse_duration_s"]

_DURATION = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|s|m|h)?$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class Stage:
    """Hold `users` users, started at `spawn_rate` users per second, for `duration_s` seconds."""

    duration_s: float
    users: int
    spawn_rate: float


def parse_duration_s(text: str) -> float:
    """`"90"`, `"90s"`, `"1.5m"`, `"500ms"` → seconds.

    Raises:
        ValueError: not a duration.
    """
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (write e.g. 30s, 2m, 500ms)")
    return float(match["value"]) * _UNIT_S[match["unit"]]


def parse_stages(text: str) -> list[Stage]:
    """`"10s:8@8,5s:32@32"` → stages; an empty text gives no stages.

    Raises:
        ValueError: a stage is not `DURATION:USERS@SPAWN_RATE` with positive numbers.
    """
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            duration, rest = part.split(":", 1)
            users, rate = rest.split("@", 1)
            stage = Stage(parse_duration_s(duration), int(users), float(rate))
        except ValueError as exc:
            raise ValueError(f"bad stage {part!r}: write DURATION:USERS@SPAWN_RATE ({exc})") from None
        if stage.duration_s <= 0 or stage.users < 0 or stage.spawn_rate <= 0:
            raise ValueError(f"bad stage {part!r}: duration and spawn rate must be > 0, users >= 0")
        stages.append(stage)
    return stages


def format_stages(stages: list[Stage]) -> str:
    return ",".join(f"{s.duration_s:g}s:{s.users}@{s.spawn_rate:g}" for s in stages)
