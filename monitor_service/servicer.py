"""The monitor's gRPC adapter for modelyard.v1.MonitorService."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2

from modelyard.rpc.errors import rpc_errors
from modelyard.v1 import model_server_service_pb2 as ms_pb
from modelyard.v1 import monitor_service_pb2 as pb
from modelyard.v1 import monitor_service_pb2_grpc as pb_grpc
from modelyard.v1 import tensor_pb2
from monitor_service.cluster import ClusterView

__all__ = ["MonitorServicer"]

_KINDS = {
    "gateway": pb.SERVICE_KIND_GATEWAY,
    "model_server": pb.SERVICE_KIND_MODEL_SERVER,
    "registry": pb.SERVICE_KIND_REGISTRY,
    "monitor": pb.SERVICE_KIND_MONITOR,
}
_STATES = {
    "up": pb.SERVICE_STATE_UP,
    "degraded": pb.SERVICE_STATE_DEGRADED,
    "down": pb.SERVICE_STATE_DOWN,
}
_VERSION_STATES = {
    "loading": ms_pb.VERSION_STATE_LOADING,
    "ready": ms_pb.VERSION_STATE_READY,
    "unloading": ms_pb.VERSION_STATE_UNLOADING,
    "failed": ms_pb.VERSION_STATE_FAILED,
}


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class MonitorServicer(pb_grpc.MonitorServiceServicer):
    """Thin adapter over ClusterView."""

    def __init__(self, cluster: ClusterView) -> None:
        self._cluster = cluster

    @rpc_errors
    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetClusterStatusResponse:
        services = []
        for view in await self._cluster.services():
            record = view.record
            loaded = [
                ms_pb.LoadedVersion(
                    model=v.model,
                    version=v.version,
                    state=_VERSION_STATES.get(v.state, ms_pb.VERSION_STATE_UNSPECIFIED),
                    error=v.error,
                    signature=json_format.ParseDict(v.signature, tensor_pb2.Signature()),
                    device=v.device,
                    outstanding_requests=v.outstanding,
                )
                for v in record.versions
            ]
            services.append(
                pb.ServiceStatus(
                    id=record.id,
                    kind=_KINDS.get(record.kind, pb.SERVICE_KIND_UNSPECIFIED),
                    address=record.address,
                    state=_STATES[view.state],
                    software_version=record.software_version,
                    start_time=_timestamp(record.start_time),
                    heartbeat_time=_timestamp(record.heartbeat_time),
                    loaded_versions=loaded,
                )
            )
        return pb.GetClusterStatusResponse(services=services)
