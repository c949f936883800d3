"""The contract between the model server's exported figures and the monitor's parser: what
`model_server.stats.RequestStats` records is what `parse_snapshot` reads back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from model_server.stats import InputMoments, RequestStats
from modelyard.errors import ModelExecutionError
from modelyard.tensor_codec import tensor_to_proto
from monitor_service.collector import parse_snapshot


async def test_requests_codes_latency_and_sampled_inputs_round_trip() -> None:
    stats = RequestStats(input_sample_every=2)
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    inputs = [tensor_to_proto("input", x)]

    async def ok() -> str:
        return "done"

    async def fail() -> str:
        raise ModelExecutionError("boom")

    for _ in range(4):
        assert await stats.observe("contract-model", 7, inputs, ok) == "done"
    with pytest.raises(ModelExecutionError):
        await stats.observe("contract-model", 7, inputs, fail)

    values = parse_snapshot(generate_latest(REGISTRY).decode())
    assert values[("req", "contract-model", 7, "OK")] == 4
    assert values[("req", "contract-model", 7, "INTERNAL")] == 1
    assert values[("lat_b", "contract-model", 7, "+Inf")] == 5
    # Requests 2 and 4 were sampled: 4 items, feature 0 = 1, 3, 1, 3; feature 1 = 2, 4, 2, 4.
    assert values[("in_n", "contract-model", 7, "input")] == 4
    assert values[("in_s", "contract-model", 7, "input/0")] == 8
    assert values[("in_q", "contract-model", 7, "input/1")] == 40


def test_input_moments_of_samples_of_different_widths_add_up_per_feature() -> None:
    moments = InputMoments(max_keys=2)
    registry = CollectorRegistry()
    registry.register(moments)
    moments.add(("widths", "1"), "x", np.array([[1.0, 2.0]]))
    moments.add(("widths", "1"), "x", np.array([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]))
    moments.add(("widths", "1"), "x", np.array([[5.0]]))

    values = parse_snapshot(generate_latest(registry).decode())
    assert values[("in_n", "widths", 1, "x")] == 4
    assert [values[("in_s", "widths", 1, f"x/{f}")] for f in range(3)] == [8, 5, 4]
    assert [values[("in_q", "widths", 1, f"x/{f}")] for f in range(3)] == [28, 9, 10]

    # A bounded number of series: past max_keys, the oldest sums start again.
    moments.add(("widths", "2"), "x", np.array([[1.0]]))
    moments.add(("widths", "3"), "x", np.array([[1.0]]))
    values = parse_snapshot(generate_latest(registry).decode())
    assert ("in_n", "widths", 1, "x") not in values and values[("in_n", "widths", 3, "x")] == 1
