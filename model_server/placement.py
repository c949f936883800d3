"""Which model versions this model server should hold, and how: pure functions over the
aliases, deployments and live model servers read from Redis.

- A model's versions to hold are its deployment's `placed_versions`; a deployment that places
  none (or a model without one) falls back to every version an alias points at.
- Each version goes on `replicas` model servers picked by rendezvous (highest random weight)
  hashing of (model, version) over the live, non-draining model servers; 0 means all. Every
  server computes the same answer from the same membership without talking to the others,
  and a server joining or leaving moves only the versions it wins or held.
- The deployment's device, precision and batching fields override this server's defaults.
  Where a deployment's own value and this server's default cannot go together, the default
  gives way (server-wide preferred batch sizes above the deployment's `max_batch_size` are
  left out; a server-wide `loop` execution becomes `auto` for a deployment with several
  instances; a deployment's `loop` runs one instance whatever the default). When what the
  deployment itself asks for cannot be served here (a preferred batch size above this
  server's `max_batch_size`), the version gets a `ServingError` instead of a configuration:
  its load fails with that reason, and a copy already serving keeps serving.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from model_server.batching import BatchConfig
from model_server.devices import ServingConfig
from model_server.optimization import Tolerance
from modelyard.coordination import Deployment
from modelyard.errors import FailedPrecondition

__all__ = [
    "rendezvous_weight",
    "owners",
    "ServingError",
    "serving_config",
    "placed_versions",
    "desired_versions",
]

VersionKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ServingError:
    """Why a placed version cannot be served with its deployment's settings on this server.

    A value (equal when the reason is), so that the reconciler can tell an unchanged bad
    deployment from a new one just as it does with `ServingConfig`.
    """

    message: str

    def error(self) -> FailedPrecondition:
        """The error its load fails with."""
        return FailedPrecondition(self.message)


def rendezvous_weight(model: str, version: int, server_id: str) -> int:
    """The weight of one server for one version (deterministic across processes)."""
    digest = hashlib.blake2b(f"{model}\0{version}\0{server_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owners(model: str, version: int, server_ids: Iterable[str], replicas: int) -> list[str]:
    """The servers that should hold a version: the `replicas` highest weights (0: all)."""
    ids = sorted(set(server_ids))
    if replicas <= 0 or replicas >= len(ids):
        return ids
    ranked = sorted(ids, key=lambda s: (rendezvous_weight(model, version, s), s), reverse=True)
    return ranked[:replicas]


def serving_config(deployment: Deployment | None, defaults: ServingConfig) -> ServingConfig:
    """A deployment's serving settings over this server's defaults (unset fields: defaults).

    Raises:
        FailedPrecondition: the deployment asks for batching this server cannot do with its
            own defaults (a preferred batch size above its `max_batch_size`), or its values
            are out of range; the message says which.
    """
    if deployment is None:
        return defaults
    batch = defaults.batch
    max_batch_size = deployment.max_batch_size or batch.max_batch_size
    instances = deployment.instances or batch.instances
    if deployment.preferred_batch_sizes:
        preferred = tuple(deployment.preferred_batch_sizes)
        too_big = sorted({size for size in preferred if size > max_batch_size})
        if too_big:
            whose = "its own" if deployment.max_batch_size else "this model server's default"
            raise FailedPrecondition(
                f"the deployment's preferred_batch_sizes {too_big} exceed max_batch_size "
                f"{max_batch_size} ({whose}); set max_batch_size in the deployment or lower "
                "the preferred sizes"
            )
    else:
        # Server-wide preferred sizes are a default: those the deployment's own
        # max_batch_size rules out are left out, not an error.
        preferred = tuple(size for size in batch.preferred_batch_sizes if size <= max_batch_size)
    execution = deployment.execution or batch.execution
    if execution == "loop" and instances != 1:
        if not deployment.execution:
            execution = "auto"
        elif not deployment.instances:
            # Asking for the loop is asking for one batch at a time.
            instances = 1
    try:
        batch = BatchConfig(
            max_batch_size=max_batch_size,
            max_queue_delay_s=(
                batch.max_queue_delay_s
                if deployment.max_queue_delay_ms is None
                else deployment.max_queue_delay_ms / 1000
            ),
            max_queue_size=deployment.max_queue_size or batch.max_queue_size,
            instances=instances,
            preferred_batch_sizes=preferred,
            execution=execution,
        )
    except ValueError as exc:
        # Only a deployment written to Redis without the registry's checks gets here.
        raise FailedPrecondition(f"the deployment's batching settings are invalid: {exc}") from exc
    return ServingConfig(
        device=deployment.device or defaults.device,
        precision=deployment.precision or defaults.precision,
        batch=batch,
        optimization=deployment.optimization or defaults.optimization,
        tolerance=Tolerance(
            max_abs_error=deployment.max_abs_error, min_top1_agreement=deployment.min_top1_agreement
        ),
    )


def placed_versions(
    aliases: Mapping[str, tuple[Mapping[str, int], int]], deployments: Mapping[str, Deployment]
) -> dict[VersionKey, int]:
    """Every version placed anywhere in the cluster, with its replica count (0: all servers).

    Args:
        aliases: model -> (alias -> version, epoch), as `CoordinationStore.all_aliases`.
        deployments: model -> Deployment, as `CoordinationStore.all_deployments`.
    """
    placed: dict[VersionKey, int] = {}
    for model in sorted({*aliases, *deployments}):
        deployment = deployments.get(model)
        versions = set(deployment.placed_versions) if deployment is not None else set()
        if not versions:
            versions = set(aliases.get(model, ({}, 0))[0].values())
        replicas = deployment.replicas if deployment is not None else 0
        for version in versions:
            placed[(model, version)] = replicas
    return placed


def desired_versions(
    aliases: Mapping[str, tuple[Mapping[str, int], int]],
    deployments: Mapping[str, Deployment],
    *,
    server_id: str,
    live_servers: Iterable[str],
    defaults: ServingConfig,
) -> dict[VersionKey, ServingConfig | ServingError]:
    """Every version this server should hold, with the configuration to serve it with, or
    why its deployment cannot be served here (`ServingError`; other models are unaffected).

    Args:
        aliases: model -> (alias -> version, epoch), as `CoordinationStore.all_aliases`.
        deployments: model -> Deployment, as `CoordinationStore.all_deployments`.
        server_id: This server's id; it counts as live even before its first heartbeat.
        live_servers: Ids of the live, non-draining model servers.
        defaults: This server's own serving settings.
    """
    servers = {server_id, *live_servers}
    desired: dict[VersionKey, ServingConfig | ServingError] = {}
    for (model, version), replicas in sorted(placed_versions(aliases, deployments).items()):
        if server_id in owners(model, version, servers, replicas):
            try:
                desired[(model, version)] = serving_config(deployments.get(model), defaults)
            except FailedPrecondition as exc:
                desired[(model, version)] = ServingError(
                    f"model {model!r} version {version} cannot be served here: {exc.message}"
                )
    return desired
