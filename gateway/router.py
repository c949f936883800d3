"""Version selection: which version of a model a call means, and which version mirrors it.

Pure selection over a `RoutingTable`, no I/O and no grpc: an explicit version wins, then an
explicit alias; a call that selects neither goes to the default alias, or is spread over the
aliases of the model's traffic split (`gateway.traffic`). A fraction of a model's calls may
be mirrored to its shadow alias's version. Replica choice and sending are
`gateway.dispatch`'s; the whole call is `gateway.dataplane`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routing_table import RoutingTable
from gateway.traffic import TrafficSplitter
from modelyard.errors import AliasNotFound, InvalidArgument
from modelyard.validation import MAX_VERSION

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where a call goes: the model, the concrete version, and the alias that chose it ("" when
    the caller named the version)."""

    model: str
    version: int
    alias: str


class Router:
    """Resolves selectors against a routing table.

    Args:
        default_alias: Alias used when a call selects nothing.
    """

    def __init__(self, *, default_alias: str = "production") -> None:
        self.default_alias = default_alias
        self._splitter = TrafficSplitter()
        self._shadow_credit: dict[str, float] = {}

    @staticmethod
    def _check(model: str, version: int) -> None:
        if not model:
            raise InvalidArgument("model is required", field="model")
        if not 0 <= version <= MAX_VERSION:
            raise InvalidArgument(f"version must be 1 or more, got {version}", field="version")

    def select(self, table: RoutingTable, model: str, version: int, alias: str) -> int:
        """The version a selector means now (no traffic split: metadata, explicit calls)."""
        self._check(model, version)
        return table.resolve(model, version, alias or self.default_alias)

    def route(
        self, table: RoutingTable, model: str, version: int, alias: str, routing_key: str = ""
    ) -> Route:
        """Resolve a call's selector, applying the model's traffic split when it selected
        nothing.

        Raises:
            InvalidArgument: no model, or a version below 0.
            ModelNotFound, VersionNotFound, AliasNotFound: nothing to route to.
        """
        self._check(model, version)
        if version:
            return Route(model, table.resolve(model, version, ""), "")
        if alias:
            return Route(model, table.resolve(model, 0, alias), alias)
        deployment = table.deployments.get(model)
        if deployment is not None and deployment.traffic_split:
            chosen = self._splitter.choose(model, deployment.traffic_split, routing_key)
            if chosen is not None:
                try:
                    return Route(model, table.resolve(model, 0, chosen), chosen)
                except AliasNotFound:
                    # A split naming an alias that is not set yet: its share goes to the
                    # default alias rather than failing.
                    pass
        alias = self.default_alias
        return Route(model, table.resolve(model, 0, alias), alias)

    def shadow_version(self, table: RoutingTable, route: Route) -> int | None:
        """The version to mirror this call to, or None. Mirrors exactly `shadow_fraction` of
        the calls (a credit counter, not a coin), and never a version to itself."""
        deployment = table.deployments.get(route.model)
        if deployment is None or not deployment.shadow_alias or deployment.shadow_fraction <= 0:
            return None
        credit = self._shadow_credit.get(route.model, 0.0) + min(deployment.shadow_fraction, 1.0)
        if credit < 1.0:
            self._shadow_credit[route.model] = credit
            return None
        self._shadow_credit[route.model] = credit - 1.0
        routes = table.models.get(route.model)
        target = routes.aliases.get(deployment.shadow_alias) if routes is not None else None
        if target is None or target == route.version:
            return None
        if not table.replicas.get((route.model, target)):
            return None
        return target
