"""What Modelyard's two Open Inference Protocol servicers (the gateway's and each model
server's) share: the model repository RPCs, which Modelyard does not offer. What is loaded
where is decided by the deployments in the registry, never by an inference client."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from modelyard.oip import grpc_service_pb2 as oip
from modelyard.oip import grpc_service_pb2_grpc
from modelyard.rpc.errors import rpc_errors

__all__ = ["REPOSITORY_UNIMPLEMENTED", "OipServicerBase"]

REPOSITORY_UNIMPLEMENTED = (
    "the model repository is managed through modelyard.v1.RegistryService: what is loaded is "
    "decided by the deployments in the registry (SetDeployment, PromoteVersion), not through "
    "the model repository RPCs"
)


class OipServicerBase(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService with RepositoryIndex, RepositoryModelLoad and
    RepositoryModelUnload answering UNIMPLEMENTED with where to go instead."""

    async def _repository_unimplemented(self, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, REPOSITORY_UNIMPLEMENTED)
        raise AssertionError("unreachable")  # abort raises

    @rpc_errors
    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryIndexResponse:
        await self._repository_unimplemented(context)

    @rpc_errors
    async def RepositoryModelLoad(
        self, request: oip.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryModelLoadResponse:
        await self._repository_unimplemented(context)

    @rpc_errors
    async def RepositoryModelUnload(
        self, request: oip.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> oip.RepositoryModelUnloadResponse:
        await self._repository_unimplemented(context)
