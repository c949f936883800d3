"""Open Inference Protocol v2 (`inference.GRPCInferenceService`) on the gateway's port, so
Triton / KServe clients (`tritonclient`, `perf_analyzer`) work against a Modelyard cluster.

A thin adapter over the same `GatewayDataPlane` as `modelyard.v1.InferenceService`:

- `model_version` selects the version: digits name a version, any other text names an alias,
  "" means the default alias (and the model's traffic split). A request parameter
  `routing_key` (string) makes the call sticky.
- ModelInfer translates the inputs with `modelyard.oip_codec.wire_inputs` (the translation a
  model server's own OIP port makes, so both accept and refuse the same requests: raw
  contents pass through as bytes; typed contents are packed once), routes them like Predict
  (check, split, shadow, coalescing, retry, passive health, metrics), and answers outputs as
  raw contents.
- ModelConfig (Triton's extension) is asked of a model server that holds the version (it
  knows the batching it runs); ModelStatistics is summed over the model servers that hold
  the selected versions.
- The repository RPCs answer UNIMPLEMENTED: what is loaded is decided by the registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format

from gateway.dataplane import Call, GatewayDataPlane
from modelyard import __version__, oip_codec
from modelyard.access import visible
from modelyard.errors import InvalidArgument, ModelNotFound, ModelyardError
from modelyard.oip import grpc_service_pb2 as oip
from modelyard.oip import grpc_service_pb2_grpc
from modelyard.oip_service import OipServicerBase
from modelyard.rpc.context import current_request_id, new_request_id
from modelyard.rpc.errors import rpc_errors, status_code_for
from modelyard.rpc.streams import answer_each
from modelyard.v1 import model_server_service_pb2, tensor_pb2
from modelyard.validation import parse_version, shown

__all__ = ["OIP_SERVICE_NAME", "OipGatewayServicer"]

OIP_SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

EXTENSIONS = ["model_configuration", "statistics"]

_OIP_METHOD = f"/{OIP_SERVICE_NAME}/"


def _selector(model_version: str) -> tuple[int, str]:
    """(version, alias) of an OIP `model_version`: "" is the default alias, a name starting
    with a lower-case letter an alias (the registry's rule for alias names), anything else must
    be a version number (1 to 2^63-1; "²", "-1" or 20 digits are INVALID_ARGUMENT)."""
    if not model_version:
        return 0, ""
    if "a" <= model_version[0] <= "z":  # alias names start with a lower-case letter
        return 0, model_version
    return parse_version(model_version) or 0, ""  # a version number, or refused as one


def _routing_key(parameters: Any) -> str:
    parameter = parameters.get("routing_key")
    if parameter is None:
        return ""
    if parameter.WhichOneof("parameter_choice") != "string_param":
        raise InvalidArgument("parameter routing_key must be a string", field="parameters[routing_key]")
    return str(parameter.string_param)


def _tensor_metadata(specs: Sequence[Any]) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    out = []
    for spec in specs:
        datatype = oip_codec.DATATYPE_BY_DATA_TYPE.get(spec.data_type)
        out.append(
            oip.ModelMetadataResponse.TensorMetadata(
                name=spec.name, datatype=datatype or "", shape=list(spec.shape)
            )
        )
    return out


def _add_duration(into: oip.StatisticDuration, other: oip.StatisticDuration) -> None:
    into.count += other.count
    into.ns += other.ns


def _merge_statistics(into: oip.ModelStatistics, other: oip.ModelStatistics) -> None:
    into.last_inference = max(into.last_inference, other.last_inference)
    into.inference_count += other.inference_count
    into.execution_count += other.execution_count
    for field in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "cache_hit",
        "cache_miss",
    ):
        _add_duration(getattr(into.inference_stats, field), getattr(other.inference_stats, field))
    sizes = {b.batch_size: b for b in into.batch_stats}
    for batch in other.batch_stats:
        mine = sizes.get(batch.batch_size)
        if mine is None:
            into.batch_stats.add().CopyFrom(batch)
            continue
        for field in ("compute_input", "compute_infer", "compute_output"):
            _add_duration(getattr(mine, field), getattr(batch, field))


class OipGatewayServicer(OipServicerBase):
    """The Open Inference Protocol over the gateway's router.

    Args:
        dataplane: Routes calls and answers metadata.
        default_timeout_s: Deadline given to a model server when the caller sent none.
        ready: Tells whether the gateway takes calls (False while draining).
    """

    def __init__(
        self,
        dataplane: GatewayDataPlane,
        *,
        default_timeout_s: float,
        ready: Callable[[], bool],
    ) -> None:
        self._dataplane = dataplane
        self._default_timeout_s = default_timeout_s
        self._ready = ready

    def _timeout(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        return self._default_timeout_s if remaining is None else max(remaining, 0.0)

    def _resolve(self, model: str, model_version: str) -> int:
        if not model:
            raise InvalidArgument("name the model", field="name")
        version, alias = _selector(model_version)
        return self._dataplane.select(model, version, alias)

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
        return oip.ServerReadyResponse(ready=self._ready())

    @rpc_errors
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelReadyResponse:
        if not request.name:
            raise InvalidArgument("name the model", field="name")
        version, alias = _selector(request.version)
        return oip.ModelReadyResponse(ready=self._dataplane.ready(request.name, version, alias))

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
        if not request.name:
            raise InvalidArgument("name the model", field="name")
        version, signature_json, platform, _aliases = self._dataplane.metadata(
            request.name, *_selector(request.version)
        )
        signature = json_format.ParseDict(signature_json, tensor_pb2.Signature())
        return oip.ModelMetadataResponse(
            name=request.name,
            versions=[str(v) for v in self._dataplane.versions_of(request.name)] or [str(version)],
            platform=oip_codec.oip_platform(platform),
            inputs=_tensor_metadata(signature.inputs),
            outputs=_tensor_metadata(signature.outputs),
        )

    @rpc_errors
    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelConfigResponse:
        version = self._resolve(request.name, request.version)
        replica = self._dataplane.replicas_of(request.name, version)[0]
        asked = oip.ModelConfigRequest(name=request.name, version=str(version))
        raw = await self._dataplane.call_replica(
            replica,
            _OIP_METHOD + "ModelConfig",
            asked.SerializeToString(),
            self._timeout(context),
            current_request_id(),
        )
        return oip.ModelConfigResponse.FromString(raw)

    @rpc_errors
    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelStatisticsResponse:
        dataplane = self._dataplane
        if request.name:
            if request.version:
                versions = [self._resolve(request.name, request.version)]
            else:
                versions = dataplane.versions_of(request.name)
                if not versions:
                    raise ModelNotFound(f"model {shown(request.name)} has no ready version", field="name")
            keys = [(request.name, v) for v in versions]
        else:
            # Every model's numbers: only those the caller may read.
            keys = [(m, v) for m, v in dataplane.held_versions() if visible("metadata", m)]
        calls = []
        for model, version in keys:
            asked = oip.ModelStatisticsRequest(name=model, version=str(version)).SerializeToString()
            for replica in dataplane.table.replicas.get((model, version), []):
                calls.append(
                    dataplane.call_replica(
                        replica,
                        _OIP_METHOD + "ModelStatistics",
                        asked,
                        self._timeout(context),
                        current_request_id(),
                    )
                )
        merged: dict[tuple[str, str], oip.ModelStatistics] = {}
        for raw in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(raw, BaseException):
                continue  # a replica that just left: its numbers are gone with it
            for stats in oip.ModelStatisticsResponse.FromString(raw).model_stats:
                key = (stats.name, stats.version)
                if key not in merged:
                    merged[key] = oip.ModelStatistics(name=stats.name, version=stats.version)
                _merge_statistics(merged[key], stats)
        return oip.ModelStatisticsResponse(model_stats=[merged[k] for k in sorted(merged)])

    # -- inference -------------------------------------------------------------------------

    async def _infer(
        self, request: oip.ModelInferRequest, timeout_s: float, request_id: str
    ) -> oip.ModelInferResponse:
        if not request.model_name:
            raise InvalidArgument("name the model", field="model_name")
        version, alias = _selector(request.model_version)
        call = Call(
            request.model_name,
            version,
            alias,
            _routing_key(request.parameters),
            oip_codec.inputs_to_protos(request),
            [o.name for o in request.outputs],
        )
        raw = await self._dataplane.serve(call, timeout_s, request_id)
        answer = model_server_service_pb2.InferResponse.FromString(raw)
        response = oip.ModelInferResponse(
            model_name=answer.model, model_version=str(answer.version), id=request.id
        )
        for tensor in answer.outputs:
            oip_codec.append_output_proto(response, tensor)
        return response

    @rpc_errors
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.ModelInferResponse:
        return await self._infer(request, self._timeout(context), request.id or current_request_id())

    @rpc_errors
    async def ModelStreamInfer(
        self,
        requests: AsyncIterator[oip.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        async def answer(item: oip.ModelInferRequest) -> oip.ModelStreamInferResponse:
            try:
                response = await self._infer(item, self._timeout(context), item.id or new_request_id())
            except ModelyardError as exc:
                message = f"{status_code_for(exc).name}: {exc.message}"[:1024]
            except grpc.aio.AioRpcError as exc:
                message = f"{exc.code().name}: {exc.details() or ''}"
            else:
                return oip.ModelStreamInferResponse(infer_response=response)
            return oip.ModelStreamInferResponse(
                error_message=message,
                infer_response=oip.ModelInferResponse(
                    model_name=item.model_name[:64], model_version=item.model_version[:64], id=item.id[:64]
                ),
            )

        async for out in answer_each(requests, answer):
            yield out

    def register(self, server: grpc.aio.Server) -> None:
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)
