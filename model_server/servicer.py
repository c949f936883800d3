"""`modelyard.v1.ModelServerService`: decode, one call into the data plane, encode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from model_server.batching import BatchTiming
from model_server.dataplane import ModelServerDataPlane
from model_server.optimization import PROFILES
from model_server.repository import LoadedVersion, VersionState
from modelyard.rpc.context import current_request_id
from modelyard.rpc.errors import rpc_errors
from modelyard.tensor_codec import tensor_to_proto
from modelyard.v1 import (
    inference_service_pb2,
    model_server_service_pb2,
    model_server_service_pb2_grpc,
)
from modelyard.validation import WireTensor

__all__ = ["ModelServerServicer", "SERVICE_NAME"]

SERVICE_NAME = model_server_service_pb2.DESCRIPTOR.services_by_name["ModelServerService"].full_name

_STATE_TO_PROTO = {
    VersionState.LOADING: model_server_service_pb2.VERSION_STATE_LOADING,
    VersionState.READY: model_server_service_pb2.VERSION_STATE_READY,
    VersionState.UNLOADING: model_server_service_pb2.VERSION_STATE_UNLOADING,
    VersionState.FAILED: model_server_service_pb2.VERSION_STATE_FAILED,
}


def _duration(seconds: float) -> duration_pb2.Duration:
    nanos = int(seconds * 1e9)
    return duration_pb2.Duration(seconds=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000)


def _timing(timing: BatchTiming) -> inference_service_pb2.ServerTiming:
    return inference_service_pb2.ServerTiming(
        queue=_duration(timing.queue_s),
        compute=_duration(timing.compute_s),
        batch_size=timing.batch_size,
    )


def _loaded_version(loaded: LoadedVersion) -> model_server_service_pb2.LoadedVersion:
    message = model_server_service_pb2.LoadedVersion(
        model=loaded.model,
        version=loaded.version,
        state=_STATE_TO_PROTO[loaded.state],
        error=loaded.error,
        signature=loaded.signature,
        device=loaded.device,
        outstanding_requests=loaded.outstanding,
    )
    if loaded.ready_time is not None:
        ready_time = timestamp_pb2.Timestamp()
        ready_time.FromNanoseconds(int(loaded.ready_time * 1e9))
        message.ready_time.CopyFrom(ready_time)
    return message


class ModelServerServicer(model_server_service_pb2_grpc.ModelServerServiceServicer):
    """Infer and GetServerStatus.

    Args:
        dataplane: Inference on the versions this server holds.
        server_id: This server's id in the cluster.
        draining: Tells whether the server is draining.
    """

    def __init__(
        self,
        dataplane: ModelServerDataPlane,
        *,
        server_id: str,
        draining: Callable[[], bool],
    ) -> None:
        self._dataplane = dataplane
        self._server_id = server_id
        self._draining = draining

    @rpc_errors
    async def Infer(
        self,
        request: model_server_service_pb2.InferRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_server_service_pb2.InferResponse:
        remaining_s = context.time_remaining()
        deadline = None if remaining_s is None else asyncio.get_running_loop().time() + remaining_s
        request_id = request.request_id or current_request_id()
        answer = await self._dataplane.infer(
            request.model,
            request.version,
            [WireTensor.of(t) for t in request.inputs],
            request.output_names,
            deadline,
            request_id=request_id,
        )
        return model_server_service_pb2.InferResponse(
            model=request.model,
            version=request.version,
            outputs=[tensor_to_proto(name, t) for name, t in answer.outputs],
            request_id=request_id,
            timing=_timing(answer.timing),
        )

    @rpc_errors
    async def GetServerStatus(
        self,
        request: model_server_service_pb2.GetServerStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_server_service_pb2.GetServerStatusResponse:
        return model_server_service_pb2.GetServerStatusResponse(
            server_id=self._server_id,
            loaded_versions=[_loaded_version(v) for v in self._dataplane.repository.versions()],
            draining=self._draining(),
        )

    @rpc_errors
    async def EvaluateOptimizations(
        self,
        request: model_server_service_pb2.EvaluateOptimizationsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> model_server_service_pb2.EvaluateOptimizationsResponse:
        reports = await self._dataplane.repository.evaluate(
            request.model,
            request.version,
            list(request.optimizations) or list(PROFILES),
            precisions=list(request.precisions) or ["fp32"],
            max_batch=request.max_batch,
            device=request.device,
            reference_device=request.reference_device,
        )
        return model_server_service_pb2.EvaluateOptimizationsResponse(
            reports=[r.to_proto(self._server_id) for r in reports]
        )
