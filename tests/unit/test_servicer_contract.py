"""Every servicer of every service, one contract: each RPC of its service in the protos is
implemented by the servicer class itself (not left to the generated base, which answers
UNIMPLEMENTED with a traceback in the log) and wears `@rpc_errors`, the one place where
exceptions become statuses."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from gateway.oip_servicer import OipGatewayServicer
from gateway.servicer import InferenceServicer
from model_server.oip_servicer import OipServicer
from model_server.servicer import ModelServerServicer
from modelyard.oip import grpc_service_pb2
from modelyard.v1 import (
    inference_service_pb2,
    model_server_service_pb2,
    monitor_service_pb2,
    registry_service_pb2,
)
from monitor_service.servicer import MonitorServicer
from registry_service.servicer import RegistryServicer

SERVICERS: list[tuple[type, Any, str]] = [
    (InferenceServicer, inference_service_pb2, "InferenceService"),
    (OipGatewayServicer, grpc_service_pb2, "GRPCInferenceService"),
    (ModelServerServicer, model_server_service_pb2, "ModelServerService"),
    (OipServicer, grpc_service_pb2, "GRPCInferenceService"),
    (RegistryServicer, registry_service_pb2, "RegistryService"),
    (MonitorServicer, monitor_service_pb2, "MonitorService"),
]


def _implementation(servicer: type, name: str) -> Any:
    """The method as the servicer's own classes define it (the generated base excluded)."""
    for cls in servicer.__mro__:
        if cls.__module__.endswith("_pb2_grpc"):
            return None
        if name in cls.__dict__:
            return cls.__dict__[name]
    return None


@pytest.mark.parametrize(
    ("servicer", "module", "service"),
    SERVICERS,
    ids=[f"{s.__module__}.{s.__name__}" for s, _, _ in SERVICERS],
)
def test_every_rpc_is_implemented_and_maps_its_errors(servicer: type, module: Any, service: str) -> None:
    descriptor = module.DESCRIPTOR.services_by_name[service]
    module_of = sys.modules[servicer.__module__]
    name = getattr(module_of, "SERVICE_NAME", None) or getattr(module_of, "OIP_SERVICE_NAME", None)
    if name is not None:  # the name it registers and reports health under
        assert name == descriptor.full_name
    methods = descriptor.methods
    assert methods
    for method in methods:
        implementation = _implementation(servicer, method.name)
        assert implementation is not None, f"{servicer.__name__}.{method.name} is not implemented"
        assert getattr(implementation, "__rpc_errors__", False), (
            f"{servicer.__name__}.{method.name} lacks @rpc_errors"
        )
