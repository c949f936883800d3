"""`modelyard.v1.AccessService` over `ApiKeys`: key management, every call audited."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
from google.protobuf import timestamp_pb2

from modelyard.access import current_principal
from modelyard.rpc.errors import rpc_errors
from modelyard.v1 import access_service_pb2 as pb
from modelyard.v1 import access_service_pb2_grpc
from registry_service.api_keys import ApiKey, ApiKeys
from registry_service.registry import Registry
from registry_service.servicer import audited

__all__ = ["AccessServicer", "ACCESS_SERVICE_NAME", "key_to_proto"]

ACCESS_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AccessService"].full_name

_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp | None:
    if not seconds:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def key_to_proto(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        key_id=key.key_id,
        name=key.name,
        grants=list(key.grants),
        create_time=_timestamp(key.created_at),
        expire_time=_timestamp(key.expires_at),
        revoke_time=_timestamp(key.revoked_at),
        created_by=key.created_by,
        rate_per_second=key.rate_per_s,
        max_concurrency=key.max_concurrency,
    )


def _actor() -> str:
    principal = current_principal()
    return principal.name if principal is not None else "anonymous (access control off)"


class AccessServicer(access_service_pb2_grpc.AccessServiceServicer):
    """Thin adapter: the checks are the interceptor's (`admin`), the rules `ApiKeys`'."""

    def __init__(self, keys: ApiKeys, registry: Registry) -> None:
        self._keys = keys
        self._registry = registry

    @rpc_errors
    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: _Context
    ) -> pb.CreateApiKeyResponse:
        async with audited(
            self._registry, context, "CreateApiKey", "", f"key {request.name[:64]}", ""
        ) as audit:
            key, token = await self._keys.create(
                request.name,
                list(request.grants),
                ttl_s=float(request.ttl_seconds),
                rate_per_s=request.rate_per_second,
                max_concurrency=request.max_concurrency,
                created_by=_actor(),
            )
            audit.target = f"key {key.key_id} ({key.name})"
            audit.message = "grants " + " ".join(key.grants)
        return pb.CreateApiKeyResponse(key=key_to_proto(key), token=token)

    @rpc_errors
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: _Context) -> pb.ListApiKeysResponse:
        return pb.ListApiKeysResponse(keys=[key_to_proto(k) for k in await self._keys.all_keys()])

    @rpc_errors
    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: _Context
    ) -> pb.RevokeApiKeyResponse:
        async with audited(
            self._registry, context, "RevokeApiKey", "", f"key {request.key[:64]}", ""
        ) as audit:
            key = await self._keys.revoke(request.key)
            audit.target = f"key {key.key_id} ({key.name})"
        return pb.RevokeApiKeyResponse(key=key_to_proto(key))

    @rpc_errors
    async def RotateApiKey(
        self, request: pb.RotateApiKeyRequest, context: _Context
    ) -> pb.RotateApiKeyResponse:
        async with audited(
            self._registry, context, "RotateApiKey", "", f"key {request.key[:64]}", ""
        ) as audit:
            new, token, previous = await self._keys.rotate(
                request.key, overlap_s=float(request.overlap_seconds), created_by=_actor()
            )
            audit.target = f"key {previous.key_id} -> {new.key_id} ({new.name})"
            audit.message = f"the old key is refused after {request.overlap_seconds} s"
        return pb.RotateApiKeyResponse(key=key_to_proto(new), token=token, previous=key_to_proto(previous))
