"""The monitor's core: the cluster's services as Redis membership shows them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from modelyard.coordination import CoordinationStore, ServiceRecord

__all__ = ["ClusterView", "ServiceView"]


@dataclass
class ServiceView:
    """One service and how it is doing: "up", "degraded" (draining) or "down"."""

    record: ServiceRecord
    state: str
    since: float


@dataclass
class ClusterView:
    """Tracks every service seen, remembering those that went quiet as down for a while."""

    store: CoordinationStore
    down_retention_s: float
    _seen: dict[str, ServiceView] = field(default_factory=dict)

    async def services(self) -> list[ServiceView]:
        now = time.time()
        live = {r.id: r for r in await self.store.list_services()}
        for service_id, record in live.items():
            state = "degraded" if record.draining else "up"
            previous = self._seen.get(service_id)
            since = previous.since if previous and previous.state == state else now
            self._seen[service_id] = ServiceView(record, state, since)
        for service_id, view in list(self._seen.items()):
            if service_id in live:
                continue
            if view.state != "down":
                self._seen[service_id] = ServiceView(view.record, "down", now)
            elif now - view.since > self.down_retention_s:
                del self._seen[service_id]
        return sorted(self._seen.values(), key=lambda v: (v.record.kind, v.record.id))
