"""The servicer's shape: every RPC of the contract is implemented and wears @rpc_errors."""

from __future__ import annotations

import pytest

from model_server.servicer import SERVICE_NAME, ModelServerServicer, _duration
from modelyard.v1 import model_server_service_pb2


def test_every_rpc_is_implemented_and_maps_its_errors() -> None:
    service = model_server_service_pb2.DESCRIPTOR.services_by_name["ModelServerService"]
    assert SERVICE_NAME == "modelyard.v1.ModelServerService"
    for method in service.methods:
        implementation = getattr(ModelServerServicer, method.name)
        assert getattr(implementation, "__rpc_errors__", False), f"{method.name} lacks @rpc_errors"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.0, (0, 0)), (0.000_25, (0, 250_000)), (1.5, (1, 500_000_000)), (12.000_001, (12, 1_000))],
)
def test_durations_are_split_into_seconds_and_nanos(seconds: float, expected: tuple[int, int]) -> None:
    duration = _duration(seconds)
    assert duration.seconds == expected[0]
    assert abs(duration.nanos - expected[1]) <= 1
