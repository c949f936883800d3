"""Which grant each RPC of each service needs: one table, read by the access interceptor.

A method missing from its service's table is refused (PERMISSION_DENIED), so a new RPC is
closed until someone writes its rule here. `grpc.health.v1` is open to every caller, for
probes; server reflection follows `access.reflection`.

Pure data: the interceptor does the checking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["AUTHENTICATED", "INTERNAL", "OPEN_SERVICES", "REFLECTION_SERVICES", "RULES", "Rule"]

AUTHENTICATED = "authenticated"
"""Any valid API key or service: no grant needed."""
INTERNAL = "internal"
"""Only the cluster's own services, never an API key (admin included)."""

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
REFLECTION_SERVICES = frozenset(
    {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)


@dataclass(frozen=True, slots=True)
class Rule:
    """What one RPC needs.

    Attributes:
        verb: A grant verb (`predict`, `registry.write`, ...), AUTHENTICATED or INTERNAL.
        model: Reads the model a request message names; None: the verb is checked without a
            model (a cluster-wide verb, or a listing that shows only what the key may see).
            For a request stream, every message is checked.
        in_handler: The request reaches the handler as bytes, which checks the model itself
            with `modelyard.access.require` once it has parsed them; the call is refused if
            the handler answers without having checked.
        mutating: Denied calls are reported to the service's `on_denied` hook (the registry
            audits them).
        limited: The gateway's per-key rate and concurrency limits apply.
    """

    verb: str
    model: Callable[[Any], str] | None = None
    in_handler: bool = False
    mutating: bool = False
    limited: bool = False


def _field(name: str) -> Callable[[Any], str]:
    def read(request: Any) -> str:
        return str(getattr(request, name))

    read.__name__ = f"request.{name}"
    return read


def _upload_model(request: Any) -> str:
    # The first message of an upload carries the metadata; the chunks after it name nothing
    # and are let through only after a first message that passed.
    return str(request.metadata.model) if request.HasField("metadata") else ""


def _stream_model(request: Any) -> str:
    return str(request.request.model)


_MODEL = _field("model")
_NAME = _field("name")
_MODEL_NAME = _field("model_name")

_GATEWAY_OIP: dict[str, Rule] = {
    "ServerLive": Rule(AUTHENTICATED),
    "ServerReady": Rule(AUTHENTICATED),
    "ServerMetadata": Rule(AUTHENTICATED),
    "ModelReady": Rule("metadata", _NAME),
    "ModelMetadata": Rule("metadata", _NAME),
    "ModelConfig": Rule("metadata", _NAME),
    "ModelStatistics": Rule("metadata", _NAME),
    "ModelInfer": Rule("predict", _MODEL_NAME, limited=True),
    "ModelStreamInfer": Rule("predict", _MODEL_NAME, limited=True),
    "RepositoryIndex": Rule("metadata"),
    "RepositoryModelLoad": Rule("deploy", _MODEL_NAME, mutating=True),
    "RepositoryModelUnload": Rule("deploy", _MODEL_NAME, mutating=True),
}

_OIP_METHODS = tuple(_GATEWAY_OIP)

RULES: Mapping[str, Mapping[str, Mapping[str, Rule]]] = {
    "gateway": {
        "modelyard.v1.InferenceService": {
            "Predict": Rule("predict", in_handler=True, limited=True),
            "PredictStream": Rule("predict", _stream_model, limited=True),
            "GetModelMetadata": Rule("metadata", _MODEL),
        },
        "inference.GRPCInferenceService": _GATEWAY_OIP,
    },
    "model_server": {
        "modelyard.v1.ModelServerService": {
            "Infer": Rule(INTERNAL),
            "GetServerStatus": Rule(INTERNAL),
            "EvaluateOptimizations": Rule(INTERNAL),
        },
        "inference.GRPCInferenceService": {name: Rule(INTERNAL) for name in _OIP_METHODS},
    },
    "registry": {
        "modelyard.v1.RegistryService": {
            "CreateModel": Rule("registry.write", _NAME, mutating=True),
            "GetModel": Rule("registry.read", _NAME),
            "ListModels": Rule("registry.read"),
            "UploadModelVersion": Rule("registry.write", _upload_model, mutating=True),
            "GetModelVersion": Rule("registry.read", _MODEL),
            "ListModelVersions": Rule("registry.read", _MODEL),
            "DownloadModelVersion": Rule(INTERNAL),
            "SetAlias": Rule("alias.move", _MODEL, mutating=True),
            "RollbackAlias": Rule("alias.move", _MODEL, mutating=True),
            "ListAliasHistory": Rule("registry.read", _MODEL),
            "PromoteVersion": Rule("alias.move", _MODEL, mutating=True),
            "SetDeployment": Rule("deploy", _MODEL, mutating=True),
            "GetDeployment": Rule("registry.read", _MODEL),
            "ArchiveModelVersion": Rule("registry.write", _MODEL, mutating=True),
            "DeleteModelVersion": Rule("registry.write", _MODEL, mutating=True),
            "ListAuditEntries": Rule("audit.read"),
            # An export hands out artifacts, which DownloadModelVersion keeps to the cluster's
            # own services: only an admin key may take a model's bytes out of the cluster.
            "ExportModel": Rule("admin"),
            # An import creates models and versions and may move aliases: the model is known
            # only from the manifest, so it takes the cluster-wide admin grant.
            "ImportModel": Rule("admin", mutating=True),
            "RecordOptimizationReports": Rule("deploy", _MODEL, mutating=True),
        },
        "modelyard.v1.AccessService": {
            "CreateApiKey": Rule("admin", mutating=True),
            "ListApiKeys": Rule("admin"),
            "RevokeApiKey": Rule("admin", mutating=True),
            "RotateApiKey": Rule("admin", mutating=True),
        },
    },
    "monitor": {
        "modelyard.v1.MonitorService": {
            "GetClusterStatus": Rule("monitor.read"),
            "GetModelStats": Rule("monitor.read"),
            "ListAlerts": Rule("monitor.read"),
            "ListCanaryDecisions": Rule("monitor.read"),
            "WatchEvents": Rule("monitor.read"),
        },
    },
}
"""Server kind → gRPC service → method → Rule."""
