"""The servicer's helpers (its contract with the protos: tests/unit/test_servicer_contract.py)."""

from __future__ import annotations

import pytest

from model_server.servicer import _duration


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.0, (0, 0)), (0.000_25, (0, 250_000)), (1.5, (1, 500_000_000)), (12.000_001, (12, 1_000))],
)
def test_durations_are_split_into_seconds_and_nanos(seconds: float, expected: tuple[int, int]) -> None:
    duration = _duration(seconds)
    assert duration.seconds == expected[0]
    assert abs(duration.nanos - expected[1]) <= 1
