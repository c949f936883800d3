"""The registry's gRPC adapter: decode, one call into `registry.Registry`, encode.

Every method wears `@rpc_errors`, which turns the core's domain errors into statuses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from modelyard.errors import InvalidArgument
from modelyard.rpc.errors import rpc_errors
from modelyard.v1 import registry_service_pb2 as pb
from modelyard.v1 import registry_service_pb2_grpc
from registry_service import convert
from registry_service.registry import Registry

__all__ = ["RegistryServicer", "SERVICE_NAME"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
"""The full name of the service ("modelyard.v1.RegistryService"), for health and reflection."""

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """`modelyard.v1.RegistryService` over a `Registry`."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    @rpc_errors
    async def CreateModel(self, request: pb.CreateModelRequest, context: _Context) -> pb.CreateModelResponse:
        model = await self._registry.create_model(
            request.name, request.description, request_id=request.request_id
        )
        return pb.CreateModelResponse(model=convert.model_to_proto(model))

    @rpc_errors
    async def GetModel(self, request: pb.GetModelRequest, context: _Context) -> pb.GetModelResponse:
        model = await self._registry.get_model(request.name)
        return pb.GetModelResponse(model=convert.model_to_proto(model))

    @rpc_errors
    async def ListModels(self, request: pb.ListModelsRequest, context: _Context) -> pb.ListModelsResponse:
        models = await self._registry.list_models()
        return pb.ListModelsResponse(models=[convert.model_to_proto(m) for m in models])

    @rpc_errors
    async def UploadModelVersion(
        self, request_iterator: AsyncIterator[pb.UploadModelVersionRequest], context: _Context
    ) -> pb.UploadModelVersionResponse:
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("content") != "metadata":
            raise InvalidArgument(
                "the first message of an upload must carry the metadata, the next ones the bytes",
                field="metadata",
            )
        version = await self._registry.upload_version(
            convert.upload_metadata_from_proto(first.metadata), _chunks(request_iterator)
        )
        return pb.UploadModelVersionResponse(model_version=convert.version_to_proto(version))

    @rpc_errors
    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: _Context
    ) -> pb.GetModelVersionResponse:
        version = await self._registry.get_version(request.model, request.version)
        return pb.GetModelVersionResponse(model_version=convert.version_to_proto(version))

    @rpc_errors
    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: _Context
    ) -> pb.ListModelVersionsResponse:
        versions = await self._registry.list_versions(request.model)
        return pb.ListModelVersionsResponse(model_versions=[convert.version_to_proto(v) for v in versions])

    @rpc_errors
    async def DownloadModelVersion(
        self, request: pb.DownloadModelVersionRequest, context: _Context
    ) -> AsyncIterator[pb.DownloadModelVersionResponse]:
        version, chunks = await self._registry.download(request.model, request.version)
        first = True
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if first:
                    # The first message also carries the whole artifact's hash and size.
                    yield pb.DownloadModelVersionResponse(
                        chunk=chunk, sha256=version.sha256, size_bytes=version.size_bytes
                    )
                    first = False
                else:
                    yield pb.DownloadModelVersionResponse(chunk=chunk)

    @rpc_errors
    async def SetAlias(self, request: pb.SetAliasRequest, context: _Context) -> pb.SetAliasResponse:
        change = await self._registry.set_alias(
            request.model,
            request.alias,
            request.version,
            expected_version=(request.expected_version if request.HasField("expected_version") else None),
            reason=request.reason,
            request_id=request.request_id,
        )
        return convert.set_alias_response(change)


async def _chunks(request_iterator: AsyncIterator[pb.UploadModelVersionRequest]) -> AsyncIterator[bytes]:
    async for message in request_iterator:
        if message.WhichOneof("content") == "metadata":
            raise InvalidArgument(
                "an upload carries its metadata in the first message only", field="metadata"
            )
        if message.chunk:
            yield message.chunk
