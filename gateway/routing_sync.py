"""Keeps the gateway's routing table in step with Redis: a rebuild on every change event and on a
timer, and the last known table kept (reported degraded) while Redis is unreachable."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from gateway.forwarder import ChannelPool
from gateway.metrics import ROUTING_AGE_SECONDS, ROUTING_DEGRADED
from gateway.routing_table import RoutingTable, keep_newer_routes
from modelyard.coordination import CoordinationStore, ServiceEvent
from modelyard.errors import CoordinationUnavailable
from modelyard.tasks import BackgroundTasks

__all__ = ["RoutingSync"]

log = logging.getLogger(__name__)


class RoutingSync:
    """Owner of the routing table (`table`, replaced whole on every refresh) and of the loops
    that refresh it; the data plane's `RoutingSource`.

    Args:
        store: Redis access.
        pool: Channels to forget when their server leaves.
        resync_interval_s: Refresh period on top of change events.
        name: This gateway's id, the label of its routing metrics.
        vanished_grace_s: How long a replica whose record vanished without a `down` event
            (a flushed or failed-over Redis) keeps getting calls while it writes its record
            again.
        on_degraded: Awaited with the new state whenever `degraded` changes (health).
    """

    def __init__(
        self,
        store: CoordinationStore,
        pool: ChannelPool,
        *,
        resync_interval_s: float,
        name: str = "gateway",
        vanished_grace_s: float = 3.0,
        on_degraded: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._pool = pool
        self.table = RoutingTable()
        """The current table: read by the data plane, replaced whole (never edited) here."""
        self._resync_interval_s = resync_interval_s
        self._wake = asyncio.Event()
        self._tasks = BackgroundTasks()
        self.degraded = False
        """True while Redis is unreachable and the table may be stale."""
        self._on_degraded = on_degraded
        self._degraded_gauge = ROUTING_DEGRADED.labels(name)
        self._refreshed_gauge = ROUTING_AGE_SECONDS.labels(name)
        self._degraded_gauge.set(0)
        self._last_refresh = float("-inf")
        self._vanished_grace_s = vanished_grace_s
        self._vanished: dict[str, float] = {}
        """Server id -> when its record was first missing (it did not say it left)."""
        self._departed: dict[str, float] = {}
        """Server id -> when its `down` event arrived (it left: never kept)."""
        self._miss_refresh: asyncio.Future[None] | None = None

    async def refresh_on_miss(self, min_interval_s: float = 0.05) -> bool:
        """Refresh now because a request named something the table lacks: a client that has
        just moved an alias (Redis already holds it) must not get NOT_FOUND because this
        gateway's event has not arrived yet. Concurrent misses share one refresh, and the
        table is not reread more often than every `min_interval_s`.

        Returns:
            True if the table was refreshed (the caller retries its lookup once).
        """
        if self._miss_refresh is not None:
            await asyncio.shield(self._miss_refresh)
            return True
        if asyncio.get_running_loop().time() - self._last_refresh < min_interval_s:
            return False
        self._miss_refresh = asyncio.ensure_future(self.refresh())
        try:
            await asyncio.shield(self._miss_refresh)
        finally:
            self._miss_refresh = None
        return True

    async def start(self) -> None:
        """Load the table once (best effort), then follow events and the timer."""
        await self.refresh()
        self._tasks.spawn("routing-refresh", self._refresh_loop)
        self._tasks.spawn("routing-events", self._event_loop)

    async def refresh(self) -> None:
        self._last_refresh = asyncio.get_running_loop().time()
        try:
            # One atomic read: aliases, deployments and membership of the same moment.
            snapshot = await self._store.routing_snapshot()
            aliases: Mapping[str, tuple[Mapping[str, int], int]] = snapshot[0]
            deployments, services = snapshot[1], snapshot[2]
        except CoordinationUnavailable as exc:
            if not self.degraded:
                log.warning("serving from the last known routing table: %s", exc)
                await self._set_degraded(True)
            return
        old = self.table
        if not aliases and old.models:
            # Redis answers but knows no model at all while this gateway routes some: it was
            # flushed or replaced (a failover to an empty replica). Keep routing from the last
            # table, reported degraded, until the registry's re-push fills it again.
            if not self.degraded:
                log.warning("Redis holds no models; serving from the last known routing table")
                await self._set_degraded(True)
            return
        if self.degraded:
            log.info("Redis is back; routing table refreshed")
            await self._set_degraded(False)
        self._refreshed_gauge.set(time.time())
        aliases, deployments = keep_newer_routes(old, aliases, deployments)
        new = RoutingTable.build(aliases, services, previous=old, deployments=deployments)
        self._keep_vanished(old, new, {record.id for record in services})
        self.table = new
        gone = {r.address for rs in old.replicas.values() for r in rs} - {
            r.address for rs in new.replicas.values() for r in rs
        }
        for address in gone:
            # Its calls in flight finish on the old channel: it closes when they are done.
            await self._pool.forget(address)

    def _keep_vanished(self, old: RoutingTable, new: RoutingTable, listed: set[str]) -> None:
        """Keep routing, for `vanished_grace_s`, to replicas whose records vanished without
        the replica saying it left (no `down` event, not draining): a FLUSHALL or a failover
        wipes every record at once, and the model servers write theirs again within a
        heartbeat. A replica that left (drain, clean shutdown) is dropped at once."""
        now = time.monotonic()
        for key, replicas in old.replicas.items():
            kept = [
                r
                for r in replicas
                if r.server_id not in listed
                and r.server_id not in self._departed
                and now - self._vanished.setdefault(r.server_id, now) < self._vanished_grace_s
            ]
            if kept and key[0] in new.models:
                current = new.replicas.setdefault(key, [])
                current.extend(r for r in kept if r not in current)
                if key not in new.signatures and key in old.signatures:
                    new.signatures[key] = old.signatures[key]
                    if key in old.checks:
                        new.checks[key] = old.checks[key]
                    if key in old.batchable:
                        new.batchable.add(key)
        for server_id in list(self._vanished):
            if server_id in listed:
                del self._vanished[server_id]  # it wrote its record again
        for server_id, left in list(self._departed.items()):
            if now - left > 60.0:
                del self._departed[server_id]

    async def _set_degraded(self, degraded: bool) -> None:
        self.degraded = degraded
        self._degraded_gauge.set(1 if degraded else 0)
        if self._on_degraded is not None:
            await self._on_degraded(degraded)

    async def _refresh_loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancellation that
            # lands during its timeout into a TimeoutError, and this loop would never stop.
            try:
                async with asyncio.timeout(self._resync_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self.refresh()

    async def _event_loop(self) -> None:
        while True:
            try:
                async for event in self._store.events():
                    if isinstance(event, ServiceEvent) and event.change == "down":
                        self._departed[event.id] = time.monotonic()
                    self._wake.set()
            except CoordinationUnavailable:
                pass
            except Exception as exc:  # noqa: BLE001 - a dropped subscription is routine
                log.debug("event subscription dropped: %s", exc)
            # The timer keeps the table fresh meanwhile; subscribe again shortly.
            await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        await self._tasks.aclose()
