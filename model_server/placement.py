"""Which model versions this model server should hold, and how: pure functions over the
aliases, deployments and live model servers read from Redis.

- A model's versions to hold are its deployment's `placed_versions`; a deployment that places
  none (or a model without one) falls back to every version an alias points at.
- Each version goes on `replicas` model servers picked by rendezvous (highest random weight)
  hashing of (model, version) over the live, non-draining model servers; 0 means all. Every
  server computes the same answer from the same membership without talking to the others,
  and a server joining or leaving moves only the versions it wins or held.
- The deployment's device, precision and batching fields override this server's defaults.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from model_server.batching import BatchConfig
from model_server.devices import ServingConfig
from modelyard.coordination import Deployment

__all__ = ["rendezvous_weight", "owners", "serving_config", "placed_versions", "desired_versions"]

VersionKey = tuple[str, int]


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
    """A deployment's serving settings over this server's defaults (unset fields: defaults)."""
    if deployment is None:
        return defaults
    batch = defaults.batch
    batch = BatchConfig(
        max_batch_size=deployment.max_batch_size or batch.max_batch_size,
        max_queue_delay_s=(
            batch.max_queue_delay_s
            if deployment.max_queue_delay_ms is None
            else deployment.max_queue_delay_ms / 1000
        ),
        max_queue_size=deployment.max_queue_size or batch.max_queue_size,
        instances=deployment.instances or batch.instances,
    )
    return ServingConfig(
        device=deployment.device or defaults.device,
        precision=deployment.precision or defaults.precision,
        batch=batch,
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
) -> dict[VersionKey, ServingConfig]:
    """Every version this server should hold, with the configuration to serve it with.

    Args:
        aliases: model -> (alias -> version, epoch), as `CoordinationStore.all_aliases`.
        deployments: model -> Deployment, as `CoordinationStore.all_deployments`.
        server_id: This server's id; it counts as live even before its first heartbeat.
        live_servers: Ids of the live, non-draining model servers.
        defaults: This server's own serving settings.
    """
    servers = {server_id, *live_servers}
    desired: dict[VersionKey, ServingConfig] = {}
    for (model, version), replicas in sorted(placed_versions(aliases, deployments).items()):
        if server_id in owners(model, version, servers, replicas):
            desired[(model, version)] = serving_config(deployments.get(model), defaults)
    return desired
