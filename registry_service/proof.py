"""The proof of a device, precision or optimisation change (SetDeployment, docs/migration.md).

Before such a change is stored, a model server that can run the new setting measures each
placed version under it against fp32 eager on the CPU, on a sample drawn from the version's
registered input baseline (`modelyard.v1.ModelServerService.EvaluateOptimizations`); the
registry then judges the figures against the deployment's tolerance. The pure rules (does a
change need a proof, can a model server run the device, is a report within the tolerance)
are functions here; `ModelServerProver` is the gRPC side, calling the model server as
service:registry with the cluster's client TLS.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc

from modelyard.coordination import ServiceRecord
from modelyard.errors import FailedPrecondition, Unavailable
from modelyard.tls import ClientTLS, open_channel
from modelyard.v1 import model_server_service_pb2, registry_pb2, tensor_pb2
from modelyard.v1.model_server_service_pb2_grpc import ModelServerServiceStub
from registry_service.records import DeploymentSpec, VersionRecord

__all__ = [
    "REFERENCE_DEVICE",
    "ModelServerProver",
    "needs_proof",
    "missing_baselines",
    "can_run",
    "choose_server",
    "beyond_tolerance",
    "figures_text",
]

log = logging.getLogger(__name__)

REFERENCE_DEVICE = "cpu"
"""Where the fp32 eager reference of a proof runs: every model server has a CPU, and a
device change is then measured against the answers the model gave before it moved, not
against the new device's own fp32 (which would show no error at all)."""

_FLOATING = frozenset(
    {
        tensor_pb2.DATA_TYPE_FP16,
        tensor_pb2.DATA_TYPE_BF16,
        tensor_pb2.DATA_TYPE_FP32,
        tensor_pb2.DATA_TYPE_FP64,
    }
)

_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
_REFUSALS = frozenset(
    {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
)
_MAX_RELAYED_CHARS = 300


def _setting(spec: DeploymentSpec) -> tuple[str, str, str]:
    return (spec.device.strip().lower(), spec.precision or "fp32", spec.optimization or "none")


def needs_proof(old: DeploymentSpec, new: DeploymentSpec) -> bool:
    """Whether going from `old` to `new` must be proven: the device, the precision or the
    optimisation changes, and `new` has a tolerance to judge it by."""
    has_tolerance = new.max_abs_error is not None or new.min_top1_agreement is not None
    return has_tolerance and _setting(old) != _setting(new)


def missing_baselines(version: VersionRecord) -> list[str]:
    """The floating inputs of a version with no registered baseline (a proof would have to
    draw them from a standard normal, which proves nothing about the model's real inputs)."""
    described = {b.input for b in version.input_baselines if b.features}
    return [
        spec.name
        for spec in version.signature.inputs
        if spec.data_type in _FLOATING and spec.name not in described
    ]


def can_run(record: ServiceRecord, device: str) -> bool:
    """Whether a model server (its membership record) can run a version on `device`: every
    one has a CPU and a default device ("" and "auto" resolve on the server itself); "cuda"
    is cuda:0. A record without `devices` is a server older than the field: the CPU only."""
    wanted = device.strip().lower()
    if wanted in ("", "auto", "cpu"):
        return True
    if wanted == "cuda":
        wanted = "cuda:0"
    return wanted in (record.devices or ["cpu"])


def choose_server(services: list[ServiceRecord], device: str) -> ServiceRecord:
    """The model server a proof runs on: a live, non-draining one that can run `device`,
    preferring the one holding the fewest versions (the proof loads the version once more),
    then the lowest id (so a retried call goes to the same one).

    Raises:
        FailedPrecondition: no model server can; the message says what the cluster has.
    """
    servers = [s for s in services if s.kind == "model_server" and not s.draining]
    able = sorted((s for s in servers if can_run(s, device)), key=lambda s: (len(s.versions), s.id))
    if able:
        return able[0]
    if not servers:
        raise FailedPrecondition(
            "no model server is up to prove the change on; start one, or set skip_proof to change "
            "the deployment without the proof"
        )
    devices = sorted({d for s in servers for d in (s.devices or ["cpu"])})
    raise FailedPrecondition(
        f"no model server can run device {device!r} to prove the change (the live model servers "
        f"have {', '.join(devices)}); start one on that device, or set skip_proof"
    )


def beyond_tolerance(
    report: registry_pb2.OptimizationReport, max_abs_error: float | None, min_top1_agreement: float | None
) -> str | None:
    """Why a report is beyond the tolerance, or None when it is within it (the rule of
    `model_server.optimization.Tolerance.violation`, which the registry does not import)."""
    if max_abs_error is not None and report.max_abs_error > max_abs_error:
        return f"max abs error {report.max_abs_error:.3g} > max_abs_error {max_abs_error:.3g}"
    if (
        min_top1_agreement is not None
        and report.HasField("top1_agreement")
        and report.top1_agreement < min_top1_agreement
    ):
        return f"top-1 agreement {report.top1_agreement:.4f} < min_top1_agreement {min_top1_agreement:.4f}"
    return None


def figures_text(report: registry_pb2.OptimizationReport) -> str:
    """The figures of a report in one short line."""
    top1 = f"{report.top1_agreement:.4f}" if report.HasField("top1_agreement") else "n/a"
    return (
        f"max abs error {report.max_abs_error:.3g}, max rel error {report.max_rel_error:.3g}, "
        f"top-1 agreement {top1} on {report.sample_items} {report.sample} items"
    )


class ModelServerProver:
    """Measures a version under a deployment's setting on a model server that can run it.

    Args:
        services: Reads the live membership records (`CoordinationStore.list_services`).
        tls: The cluster's client TLS, or None (plaintext).
        token: The registry's own service token (service:registry), or None (no secret).
        timeout_s: How long one version's measurement may take before the proof gives up.
    """

    def __init__(
        self,
        services: Callable[[], Awaitable[list[ServiceRecord]]],
        tls: ClientTLS | None,
        token: str | None,
        *,
        timeout_s: float,
    ) -> None:
        self._services = services
        self._tls = tls
        self._token = token
        self._timeout_s = timeout_s

    async def choose(self, device: str) -> ServiceRecord:
        """The model server that will measure `device` (see `choose_server`).

        Raises:
            FailedPrecondition: none can. CoordinationUnavailable: Redis is down.
        """
        return choose_server(await self._services(), device)

    async def measure(
        self, server: ServiceRecord, model: str, version: int, spec: DeploymentSpec
    ) -> registry_pb2.OptimizationReport:
        """One version under `spec`'s device, precision and optimisation, against fp32 eager
        on the CPU, measured by `server`.

        Raises:
            Unavailable: the model server did not answer within the timeout, or is down.
            FailedPrecondition: it refused to measure (its message is relayed, bounded).
        """
        request = model_server_service_pb2.EvaluateOptimizationsRequest(
            model=model,
            version=version,
            optimizations=[spec.optimization or "none"],
            precisions=[spec.precision or "fp32"],
            max_batch=spec.max_batch_size,
            device=spec.device,
            reference_device=REFERENCE_DEVICE,
        )
        async with open_channel(server.address, self._tls, token=self._token, client="registry") as channel:
            stub = ModelServerServiceStub(channel)
            try:
                response = await stub.EvaluateOptimizations(request, timeout=self._timeout_s)
            except grpc.aio.AioRpcError as exc:
                relayed = (exc.details() or "")[:_MAX_RELAYED_CHARS]
                where = f"model server {server.id} ({server.address})"
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise Unavailable(
                        f"{where} did not measure version {version} within {self._timeout_s:g}s; "
                        "nothing changed",
                        retry_after_s=1.0,
                    ) from None
                if exc.code() in _RETRYABLE:
                    raise Unavailable(
                        f"{where} is unreachable: {relayed}; nothing changed", retry_after_s=1.0
                    ) from None
                if exc.code() in _REFUSALS:
                    raise FailedPrecondition(
                        f"{where} could not measure version {version} under the new setting: "
                        f"{relayed}; nothing changed"
                    ) from None
                # UNAUTHENTICATED, PERMISSION_DENIED, ...: the cluster's own configuration (its
                # secret, its certificates) keeps the registry from proving; a retry cannot help.
                raise FailedPrecondition(
                    f"{where} refused the registry's proof call ({exc.code().name}): {relayed}; "
                    "nothing changed"
                ) from None
        if len(response.reports) != 1:
            raise Unavailable(f"model server {server.id} answered {len(response.reports)} reports, not 1")
        return response.reports[0]
