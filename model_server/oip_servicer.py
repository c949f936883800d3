"""Open Inference Protocol v2 (`inference.GRPCInferenceService`) on the model server's own
port, so one model server can be used alone, like Triton, and `perf_analyzer` can drive it.

A thin adapter over `ModelServerDataPlane` (the one `ModelServerService.Infer` uses): tensors
go through `modelyard.oip_codec`, inference through the data plane. Served:
ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (raw and typed
contents), ModelConfig (Triton's extension) and ModelStatistics. A `model_version` of "" means
the highest version ready here. The repository RPCs answer UNIMPLEMENTED: what a model server
holds is decided by the deployments in Redis, not by its callers. ModelStreamInfer answers
UNIMPLEMENTED too: the gateway's GRPCInferenceService serves it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc

from model_server.dataplane import ModelServerDataPlane
from model_server.repository import LoadedVersion, VersionState
from modelyard import __version__, oip_codec
from modelyard.errors import ModelNotFound, VersionNotReady
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.oip import model_config_pb2
from modelyard.oip_service import OipServicerBase
from modelyard.rpc.context import current_request_id
from modelyard.rpc.errors import rpc_errors
from modelyard.tensor_codec import DTYPE_BY_DATA_TYPE
from modelyard.v1 import tensor_pb2
from modelyard.validation import parse_version

__all__ = ["OIP_SERVICE_NAME", "TRITON_PLATFORM", "OipServicer"]

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


TRITON_PLATFORM = "pytorch_libtorch"
"""The platform ModelConfig (Triton's extension) reports: Triton's name for its PyTorch
backend, which Triton's tools expect there. ModelMetadata reports the OIP spec's names
(`oip_codec.oip_platform`)."""

EXTENSIONS = ["model_configuration", "statistics"]


def _config_data_type(data_type: tensor_pb2.DataType) -> model_config_pb2.DataType:
    """modelyard.v1.DataType -> Triton's model_config DataType (TYPE_FP32, ...)."""
    name = oip_codec.DATATYPE_BY_DTYPE[DTYPE_BY_DATA_TYPE[data_type]]
    # cast: the enum wrapper's Value() is typed int; it returns a model_config DataType value.
    return cast("model_config_pb2.DataType", model_config_pb2.DataType.Value("TYPE_" + name))


def _duration(count: int, seconds: float) -> oip.StatisticDuration:
    return oip.StatisticDuration(count=count, ns=int(seconds * 1e9))


class OipServicer(OipServicerBase):
    """The Open Inference Protocol over a model server's repository.

    Args:
        dataplane: Inference on the versions this server holds.
        draining: Tells whether the server is draining (then it is live but not ready).
    """

    def __init__(self, dataplane: ModelServerDataPlane, *, draining: Callable[[], bool]) -> None:
        self._dataplane = dataplane
        self._repository = dataplane.repository
        self._draining = draining

    # -- lookup ----------------------------------------------------------------------------

    def _held(self, model: str) -> list[LoadedVersion]:
        return [v for v in self._repository.versions() if v.model == model]

    def _version(self, model: str, version: str) -> LoadedVersion:
        """A ready version by OIP name and version string ("" = the highest ready)."""
        return self._dataplane.resolve(model, parse_version(version))

    # -- health ----------------------------------------------------------------------------

    @rpc_errors
    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @rpc_errors
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=not self._draining())

    @rpc_errors
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelReadyResponse:
        try:
            self._version(request.name, request.version)
        except (ModelNotFound, VersionNotReady):
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=True)

    # -- metadata --------------------------------------------------------------------------

    @rpc_errors
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="modelyard", version=__version__, extensions=EXTENSIONS)

    @rpc_errors
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelMetadataResponse:
        loaded = self._version(request.name, request.version)
        ready = [str(v.version) for v in self._held(request.name) if v.state is VersionState.READY]

        def metadata(specs: Any) -> list[oip.ModelMetadataResponse.TensorMetadata]:
            return [
                oip.ModelMetadataResponse.TensorMetadata(
                    name=s.name,
                    datatype=oip_codec.DATATYPE_BY_DTYPE[DTYPE_BY_DATA_TYPE[s.data_type]],
                    shape=s.shape,
                )
                for s in specs
            ]

        return oip.ModelMetadataResponse(
            name=loaded.model,
            versions=ready,
            platform=oip_codec.oip_platform(loaded.platform),
            inputs=metadata(loaded.signature.inputs),
            outputs=metadata(loaded.signature.outputs),
        )

    @rpc_errors
    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelConfigResponse:
        loaded = self._version(request.name, request.version)
        batching = loaded.check.batching
        batch = loaded.serving.batch
        # Triton's dims exclude the batch dimension when max_batch_size > 0.
        skip = 1 if batching else 0
        config = model_config_pb2.ModelConfig(
            name=loaded.model,
            platform=TRITON_PLATFORM,
            backend="pytorch",
            max_batch_size=batch.max_batch_size if batching else 0,
            input=[
                model_config_pb2.ModelInput(
                    name=s.name, data_type=_config_data_type(s.data_type), dims=list(s.shape)[skip:]
                )
                for s in loaded.signature.inputs
            ],
            output=[
                model_config_pb2.ModelOutput(
                    name=s.name, data_type=_config_data_type(s.data_type), dims=list(s.shape)[skip:]
                )
                for s in loaded.signature.outputs
            ],
            instance_group=[
                model_config_pb2.ModelInstanceGroup(
                    name=f"{loaded.model}_{loaded.version}",
                    kind=(
                        model_config_pb2.ModelInstanceGroup.KIND_CPU
                        if loaded.device == "cpu"
                        else model_config_pb2.ModelInstanceGroup.KIND_GPU
                    ),
                    count=batch.instances,
                    gpus=[] if loaded.device == "cpu" else [int(loaded.device.partition(":")[2] or 0)],
                )
            ],
        )
        if batching:
            config.dynamic_batching.max_queue_delay_microseconds = int(batch.max_queue_delay_s * 1e6)
        return oip.ModelConfigResponse(config=config)

    @rpc_errors
    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelStatisticsResponse:
        if request.name and request.version:
            versions = [self._version(request.name, request.version)]
        elif request.name:
            versions = [v for v in self._held(request.name) if v.state is VersionState.READY]
            if not versions:
                raise ModelNotFound(f"model {request.name!r} has no ready version on this server")
        else:
            versions = [v for v in self._repository.versions() if v.state is VersionState.READY]
        response = oip.ModelStatisticsResponse()
        for loaded in versions:
            if loaded.batcher is None:
                continue
            stats = loaded.batcher.stats
            message = response.model_stats.add(
                name=loaded.model,
                version=str(loaded.version),
                last_inference=stats.last_inference_ms,
                inference_count=stats.inference_count,
                execution_count=stats.execution_count,
            )
            inference = message.inference_stats
            inference.success.CopyFrom(_duration(stats.success_count, stats.success_s))
            inference.fail.CopyFrom(_duration(stats.fail_count, stats.fail_s))
            inference.queue.CopyFrom(_duration(stats.success_count, stats.queue_s))
            # Triton's clients (perf_analyzer) require equal counts in compute_input,
            # compute_infer and compute_output; tensor conversion is timed as part of the
            # forward here, so input and output carry the count with no time of their own.
            inference.compute_input.CopyFrom(_duration(stats.success_count, 0.0))
            inference.compute_infer.CopyFrom(_duration(stats.success_count, stats.compute_s))
            inference.compute_output.CopyFrom(_duration(stats.success_count, 0.0))
            for size, (count, seconds) in sorted(stats.batches.items()):
                message.batch_stats.add(
                    batch_size=size,
                    compute_input=_duration(count, 0.0),
                    compute_infer=_duration(count, seconds),
                    compute_output=_duration(count, 0.0),
                )
        return response

    # -- inference -------------------------------------------------------------------------

    @rpc_errors
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelInferResponse:
        remaining_s = context.time_remaining()
        deadline = None if remaining_s is None else asyncio.get_running_loop().time() + remaining_s
        answer = await self._dataplane.infer(
            request.model_name,
            parse_version(request.model_version),
            oip_codec.wire_inputs(request),
            [o.name for o in request.outputs],
            deadline,
            request_id=request.id or current_request_id(),
            output_field="outputs[{name}]",
        )
        response = oip.ModelInferResponse(
            model_name=answer.loaded.model, model_version=str(answer.loaded.version), id=request.id
        )
        oip_codec.encode_outputs(response, answer.outputs)
        return response

    @rpc_errors
    async def ModelStreamInfer(
        self,
        requests: AsyncIterator[oip.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "a model server does not serve ModelStreamInfer: call ModelInfer, or stream through "
            "the gateway's GRPCInferenceService",
        )
        # abort raises; the yield makes this an async generator, as a response stream handler is.
        yield oip.ModelStreamInferResponse()
