"""The in-memory routing table: which version an alias points at, and which model servers
hold which versions. Pure data, rebuilt from Redis; the Predict path only reads it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelyard.coordination import ServiceRecord
from modelyard.errors import AliasNotFound, ModelNotFound, NoReadyReplica

__all__ = ["Replica", "RoutingTable"]


@dataclass(eq=False)
class Replica:
    """A model server as the gateway sees it. `outstanding` counts this gateway's calls in
    flight to it; it is what replica choice balances."""

    server_id: str
    address: str
    outstanding: int = 0


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

    @classmethod
    def build(
        cls,
        aliases: Mapping[str, tuple[Mapping[str, int], int]],
        services: Iterable[ServiceRecord],
        previous: RoutingTable | None = None,
    ) -> RoutingTable:
        """A new table from Redis's view, keeping the Replica objects (and their in-flight
        counts) of servers that are still there."""
        known: dict[str, Replica] = {}
        if previous is not None:
            for replicas in previous.replicas.values():
                for replica in replicas:
                    known[replica.server_id] = replica
        table = cls(models={m: _ModelRoutes(dict(a), e) for m, (a, e) in aliases.items()})
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
                table.signatures.setdefault(key, (version.signature, version.platform))
        return table

    def resolve(self, model: str, version: int, alias: str) -> int:
        """The concrete version for a request's selector (an explicit version wins)."""
        routes = self.models.get(model)
        if version:
            if routes is None and not any(k[0] == model for k in self.replicas):
                raise ModelNotFound(f"model {model!r} does not exist", field="model")
            return version
        if routes is None:
            raise ModelNotFound(
                f"model {model!r} does not exist or has no alias yet", field="model"
            )
        target = routes.aliases.get(alias)
        if target is None:
            known = ", ".join(sorted(routes.aliases)) or "none"
            raise AliasNotFound(
                f"model {model!r} has no alias {alias!r} (its aliases: {known})", field="alias"
            )
        return target

    def ready_replicas(self, model: str, version: int) -> list[Replica]:
        """Replicas that hold the version ready; NoReadyReplica if there is none."""
        replicas = self.replicas.get((model, version))
        if not replicas:
            raise NoReadyReplica(
                f"no model server has {model} v{version} ready yet; retry shortly",
                metadata={"model": model, "version": str(version)},
                retry_after_s=0.5,
            )
        return replicas

    def aliases_of(self, model: str, version: int) -> list[str]:
        routes = self.models.get(model)
        if routes is None:
            return []
        return sorted(a for a, v in routes.aliases.items() if v == version)
