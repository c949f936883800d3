"""What the scenarios ask of the registry, over `modelyard.v1.RegistryService`: copy the
serving version into a new one, promote it, roll it back (promote_rollback); read and replace a
model's deployment (server_lost, so that its own model server is given the version)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf import duration_pb2

from modelyard.v1 import registry_pb2 as reg_pb2
from modelyard.v1 import registry_service_pb2 as reg
from modelyard.v1 import registry_service_pb2_grpc as reg_grpc

__all__ = [
    "LOAD_TEST_CLIENT",
    "copy_version",
    "promote",
    "rollback",
    "get_deployment",
    "set_deployment",
    "spec_of",
]

CHUNK_BYTES = 1 << 20
LOAD_TEST_CLIENT = "load-test"
"""The load tests' name: their service token's kind with the cluster secret (`service:load-test`
in the registry's audit), and the client they claim in their user-agent."""


async def copy_version(
    channel: grpc.aio.Channel, model: str, version: int, *, download: grpc.aio.Channel | None = None
) -> int:
    """Upload the artifact and signature of `model` v`version` again as a new version.

    A byte-identical copy answers exactly like the original, so a promote to it and a
    rollback from it change which version serves, never what the callers get back.

    Args:
        channel: The registry, as the caller (its API key).
        model: The model.
        version: The version to copy.
        download: The registry, as one of the cluster's services: DownloadModelVersion is
            internal to the cluster and refuses API keys. None: `channel` (access control off).

    Returns:
        The new version's number.
    """
    stub = reg_grpc.RegistryServiceStub(channel)
    source = (
        await stub.GetModelVersion(reg.GetModelVersionRequest(model=model, version=version))
    ).model_version
    artifact = bytearray()
    downloads = reg_grpc.RegistryServiceStub(download) if download is not None else stub
    async for part in downloads.DownloadModelVersion(
        reg.DownloadModelVersionRequest(model=model, version=version)
    ):
        artifact += part.chunk

    async def upload() -> AsyncIterator[reg.UploadModelVersionRequest]:
        yield reg.UploadModelVersionRequest(
            metadata=reg.UploadModelVersionMetadata(
                model=model,
                format=source.format,
                sha256=hashlib.sha256(artifact).hexdigest(),
                signature=source.signature,
                description=f"copy of v{version} for the promote_rollback load test",
                labels={"created-by": "load-tests", "copy-of": str(version)},
            )
        )
        for start in range(0, len(artifact), CHUNK_BYTES):
            yield reg.UploadModelVersionRequest(chunk=bytes(artifact[start : start + CHUNK_BYTES]))

    uploaded = await stub.UploadModelVersion(upload())
    return int(uploaded.model_version.version)


async def promote(
    channel: grpc.aio.Channel, model: str, alias: str, version: int, *, expected: int, ready_timeout_s: float
) -> reg.PromoteVersionResponse:
    """Zero-downtime promote: the registry has `version` loaded and ready before the alias moves."""
    timeout = duration_pb2.Duration()
    timeout.FromMilliseconds(int(ready_timeout_s * 1000))
    reply: reg.PromoteVersionResponse = await reg_grpc.RegistryServiceStub(channel).PromoteVersion(
        reg.PromoteVersionRequest(
            model=model,
            alias=alias,
            version=version,
            expected_version=expected,
            ready_timeout=timeout,
            reason="load test: promote under load",
        ),
        timeout=ready_timeout_s + 10,
    )
    return reply


async def rollback(
    channel: grpc.aio.Channel, model: str, alias: str, *, expected: int
) -> reg.RollbackAliasResponse:
    """Move the alias back to where it pointed before."""
    reply: reg.RollbackAliasResponse = await reg_grpc.RegistryServiceStub(channel).RollbackAlias(
        reg.RollbackAliasRequest(
            model=model,
            alias=alias,
            expected_version=expected,
            reason="load test: rollback under load",
        ),
        timeout=30,
    )
    return reply


async def get_deployment(channel: grpc.aio.Channel, model: str) -> reg_pb2.Deployment:
    """A model's deployment as the registry has it now (with its output-only fields)."""
    reply = await reg_grpc.RegistryServiceStub(channel).GetDeployment(
        reg.GetDeploymentRequest(model=model), timeout=10
    )
    deployment: reg_pb2.Deployment = reply.deployment
    return deployment


async def set_deployment(
    channel: grpc.aio.Channel, model: str, deployment: reg_pb2.Deployment, *, expected_epoch: int = 0
) -> reg_pb2.Deployment:
    """Replace a model's deployment; the output-only fields of `deployment` are ignored. With
    `expected_epoch`, only if the model's routing epoch is still that one (else ABORTED).

    Returns:
        The deployment as it is now, with the versions it places and its epoch.
    """
    reply = await reg_grpc.RegistryServiceStub(channel).SetDeployment(
        reg.SetDeploymentRequest(model=model, deployment=spec_of(deployment), expected_epoch=expected_epoch),
        timeout=10,
    )
    result: reg_pb2.Deployment = reply.deployment
    return result


def spec_of(deployment: reg_pb2.Deployment) -> reg_pb2.Deployment:
    """`deployment` without its output-only fields: what SetDeployment takes, and what two
    deployments are compared on."""
    spec = reg_pb2.Deployment()
    spec.CopyFrom(deployment)
    spec.ClearField("placed_versions")
    spec.ClearField("epoch")
    return spec
