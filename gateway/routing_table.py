"""The in-memory routing table: which version an alias points at, and which model servers
hold which versions. Pure data, rebuilt from Redis; the Predict path only reads it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelyard.coordination import Deployment, ServiceRecord
from modelyard.errors import AliasNotFound, ModelNotFound, NoReadyReplica, VersionNotFound
from modelyard.validation import InputCheck, shown

__all__ = ["Replica", "RoutingSource", "RoutingTable", "StaticRoutes", "keep_newer_routes"]


@dataclass(eq=False)
class Replica:
    """A model server as the gateway sees it. `outstanding` counts this gateway's callers in
    flight to it; it is what replica choice balances. `failures` and `ejected_until` are the
    passive health of the replica as this gateway saw it (see `gateway.outlier`)."""

    server_id: str
    address: str
    outstanding: int = 0
    failures: int = 0
    """Consecutive failed calls."""
    ejected_until: float = 0.0
    """Monotonic time until which the replica gets no work (0: not ejected)."""
    started: dict[int, float] = field(default_factory=dict)
    """Start times of this gateway's calls in flight to it, oldest first (stall detection)."""
    latency_s: float | None = None
    """Its typical latency as this gateway saw it (a moving average of answered calls)."""
    answered_at: float = 0.0
    """Monotonic time the last of this gateway's calls to it ended."""


@dataclass(frozen=True)
class _ModelRoutes:
    aliases: Mapping[str, int]
    epoch: int


@dataclass
class RoutingTable:
    """Aliases per model and ready replicas per (model, version)."""

    models: dict[str, _ModelRoutes] = field(default_factory=dict)
    replicas: dict[tuple[str, int], list[Replica]] = field(default_factory=dict)
    signatures: dict[tuple[str, int], tuple[dict[str, Any], str]] = field(default_factory=dict)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    """Per model: traffic split and shadow mirroring (absent: the default Deployment)."""
    batchable: set[tuple[str, int]] = field(default_factory=set)
    """Versions whose every input and output has a batch dimension (-1 first): calls to them
    may be coalesced."""
    checks: dict[tuple[str, int], InputCheck] = field(default_factory=dict)
    """Per ready version: its signature compiled for checking requests."""

    @classmethod
    def build(
        cls,
        aliases: Mapping[str, tuple[Mapping[str, int], int]],
        services: Iterable[ServiceRecord],
        previous: RoutingTable | None = None,
        deployments: Mapping[str, Deployment] | None = None,
    ) -> RoutingTable:
        """A new table from Redis's view, keeping the Replica objects (their in-flight counts
        and passive health) of servers that are still there."""
        known: dict[str, Replica] = {}
        if previous is not None:
            for replicas in previous.replicas.values():
                for old_replica in replicas:
                    known[old_replica.server_id] = old_replica
        table = cls(
            models={m: _ModelRoutes(dict(a), e) for m, (a, e) in aliases.items()},
            deployments=dict(deployments or {}),
        )
        for record in services:
            if record.kind != "model_server" or record.draining:
                continue
            replica = known.get(record.id)
            if replica is None or replica.address != record.address:
                replica = Replica(record.id, record.address)
            for version in record.versions:
                if version.state != "ready":
                    continue
                key = (version.model, version.version)
                table.replicas.setdefault(key, []).append(replica)
                if key not in table.signatures:
                    table.signatures[key] = (version.signature, version.platform)
                    if version.signature.get("inputs"):  # a record without one: the model
                        # server checks alone, and the version's calls are never joined
                        table.checks[key] = InputCheck.from_json(version.model, version.signature)
                    if _batchable(version.signature):
                        table.batchable.add(key)
        return table

    def deployed_versions(self, model: str) -> set[int]:
        """Every version of a model that is, or is about to be, served: aliased, placed by
        its deployment, or ready on some replica."""
        versions = {v for m, v in self.replicas if m == model}
        routes = self.models.get(model)
        if routes is not None:
            versions.update(routes.aliases.values())
        deployment = self.deployments.get(model)
        if deployment is not None:
            versions.update(deployment.placed_versions)
        return versions

    def resolve(self, model: str, version: int, alias: str) -> int:
        """The concrete version for a request's selector (an explicit version wins)."""
        routes = self.models.get(model)
        if version:
            if routes is None and not any(k[0] == model for k in self.replicas):
                raise ModelNotFound(f"model {shown(model)} does not exist", field="model")
            deployed = self.deployed_versions(model)
            if version not in deployed:
                # Not retryable: no server has it and none is about to load it.
                listed = ", ".join(str(v) for v in sorted(deployed)[:16]) or "none"
                raise VersionNotFound(
                    f"model {shown(model)} has no version {version} deployed (deployed: {listed})",
                    field="version",
                )
            return version
        if routes is None:
            raise ModelNotFound(f"model {shown(model)} does not exist or has no alias yet", field="model")
        target = routes.aliases.get(alias)
        if target is None:
            known = ", ".join(sorted(routes.aliases)) or "none"
            raise AliasNotFound(
                f"model {shown(model)} has no alias {shown(alias)} (its aliases: {known})", field="alias"
            )
        return target

    def ready_replicas(self, model: str, version: int) -> list[Replica]:
        """Replicas that hold the version ready; NoReadyReplica if there is none."""
        replicas = self.replicas.get((model, version))
        if not replicas:
            raise NoReadyReplica(
                f"no model server has {model[:64]} v{version} ready yet; retry shortly",
                metadata={"model": model[:64], "version": str(version)},
                retry_after_s=0.5,
            )
        return replicas

    def deployment(self, model: str) -> Deployment | None:
        """The model's deployment, or None when it has none."""
        return self.deployments.get(model)

    def aliases_of(self, model: str, version: int) -> list[str]:
        routes = self.models.get(model)
        if routes is None:
            return []
        return sorted(a for a, v in routes.aliases.items() if v == version)


class RoutingSource(Protocol):
    """Where the data plane reads the current routing table (`RoutingSync` in a gateway)."""

    @property
    def table(self) -> RoutingTable: ...

    async def refresh_on_miss(self) -> bool:
        """Refresh now because a call named something the table lacks; True if refreshed
        (the lookup is worth one more try)."""
        ...


class StaticRoutes:
    """A routing source that is a fixed table (tools, tests); `table` may be replaced."""

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.table = table or RoutingTable()

    async def refresh_on_miss(self) -> bool:
        return False


def _batchable(signature: Mapping[str, Any]) -> bool:
    """Whether a signature (protobuf JSON) has a batch dimension on every tensor."""
    specs = [*signature.get("inputs", ()), *signature.get("outputs", ())]
    return bool(specs) and all(spec.get("shape") and int(spec["shape"][0]) == -1 for spec in specs)


def keep_newer_routes(
    previous: RoutingTable,
    aliases: Mapping[str, tuple[Mapping[str, int], int]],
    deployments: Mapping[str, Deployment],
) -> tuple[dict[str, tuple[Mapping[str, int], int]], dict[str, Deployment]]:
    """Redis's alias maps, except where the gateway already routes by a newer epoch.

    Epochs only move forward, so an older epoch in Redis is a stale read (a replica promoted
    before it caught up, a restored snapshot): the newer routes are kept until the registry's
    re-push brings Redis forward again.
    """
    merged = dict(aliases)
    kept = dict(deployments)
    for model, routes in previous.models.items():
        current = merged.get(model)
        if current is not None and current[1] < routes.epoch:
            merged[model] = (routes.aliases, routes.epoch)
            if model in previous.deployments:
                kept[model] = previous.deployments[model]
    return merged, kept
