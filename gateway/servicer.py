"""The gateway's gRPC adapter for modelyard.v1.InferenceService.

Predict is registered with no (de)serializers: it takes and returns bytes, which the data
plane forwards as they are. The other methods use the generated message classes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import json_format

from gateway.dataplane import GatewayDataPlane
from modelyard.errors import ModelyardError
from modelyard.rpc.context import current_request_id, new_request_id
from modelyard.rpc.errors import rpc_errors, status_code_for
from modelyard.rpc.streams import answer_each
from modelyard.v1 import inference_service_pb2 as pb
from modelyard.v1 import tensor_pb2

__all__ = ["InferenceServicer", "SERVICE_NAME"]

SERVICE_NAME = "modelyard.v1.InferenceService"


class InferenceServicer:
    """Thin adapter: decode, one call into the data plane, encode."""

    def __init__(self, dataplane: GatewayDataPlane, *, default_timeout_s: float) -> None:
        self._dataplane = dataplane
        self._default_timeout_s = default_timeout_s

    def _timeout(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        return self._default_timeout_s if remaining is None else max(remaining, 0.0)

    @rpc_errors
    async def Predict(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return await self._dataplane.predict(request, self._timeout(context), current_request_id())

    @rpc_errors
    async def PredictStream(
        self,
        requests: AsyncIterator[pb.PredictStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.PredictStreamResponse]:
        async def answer(message: pb.PredictStreamRequest) -> pb.PredictStreamResponse:
            item = message.request
            request_id = item.request_id or new_request_id()
            try:
                raw = await self._dataplane.predict(
                    item.SerializeToString(), self._timeout(context), request_id
                )
            except ModelyardError as exc:
                return pb.PredictStreamResponse(
                    error=pb.StreamError(
                        request_id=request_id,
                        code=status_code_for(exc).value[0],
                        message=exc.message[:1024],
                        reason=exc.reason,
                    )
                )
            except grpc.aio.AioRpcError as exc:
                return pb.PredictStreamResponse(
                    error=pb.StreamError(
                        request_id=request_id, code=exc.code().value[0], message=exc.details() or ""
                    )
                )
            response = pb.PredictResponse.FromString(raw)
            response.request_id = request_id
            return pb.PredictStreamResponse(response=response)

        async for out in answer_each(requests, answer):
            yield out

    @rpc_errors
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetModelMetadataResponse:
        version, signature, platform, aliases = self._dataplane.metadata(
            request.model, request.version, request.alias
        )
        return pb.GetModelMetadataResponse(
            model=request.model,
            version=version,
            signature=json_format.ParseDict(signature, tensor_pb2.Signature()),
            aliases=aliases,
            platform=platform,
        )

    def register(self, server: grpc.aio.Server) -> None:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Predict": grpc.unary_unary_rpc_method_handler(self.Predict),
            "PredictStream": grpc.stream_stream_rpc_method_handler(
                self.PredictStream,
                request_deserializer=pb.PredictStreamRequest.FromString,
                response_serializer=pb.PredictStreamResponse.SerializeToString,
            ),
            "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
                self.GetModelMetadata,
                request_deserializer=pb.GetModelMetadataRequest.FromString,
                response_serializer=pb.GetModelMetadataResponse.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
