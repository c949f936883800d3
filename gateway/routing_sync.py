"""Keeps the router's table in step with Redis: a rebuild on every change event and on a
timer, and the last known table kept (reported degraded) while Redis is unreachable."""

from __future__ import annotations

import asyncio
import logging

from gateway.forwarder import ChannelPool
from gateway.router import Router
from gateway.routing_table import RoutingTable
from modelyard.coordination import CoordinationStore
from modelyard.errors import CoordinationUnavailable
from modelyard.tasks import BackgroundTasks

__all__ = ["RoutingSync"]

log = logging.getLogger(__name__)


class RoutingSync:
    """Owner of the loops that refresh `router.table`."""

    def __init__(
        self, store: CoordinationStore, router: Router, pool: ChannelPool, *, resync_interval_s: float
    ) -> None:
        self._store = store
        self._router = router
        self._pool = pool
        self._resync_interval_s = resync_interval_s
        self._wake = asyncio.Event()
        self._tasks = BackgroundTasks()
        self.degraded = False
        """True while Redis is unreachable and the table may be stale."""

    async def start(self) -> None:
        """Load the table once (best effort), then follow events and the timer."""
        await self.refresh()
        self._tasks.spawn("routing-refresh", self._refresh_loop)
        self._tasks.spawn("routing-events", self._event_loop)

    async def refresh(self) -> None:
        try:
            aliases = await self._store.all_aliases()
            services = await self._store.list_services()
        except CoordinationUnavailable as exc:
            if not self.degraded:
                log.warning("serving from the last known routing table: %s", exc)
            self.degraded = True
            return
        if self.degraded:
            log.info("Redis is back; routing table refreshed")
        self.degraded = False
        old = self._router.table
        new = RoutingTable.build(aliases, services, previous=old)
        self._router.table = new
        gone = {r.address for rs in old.replicas.values() for r in rs} - {
            r.address for rs in new.replicas.values() for r in rs
        }
        for address in gone:
            await self._pool.forget(address)

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
                async for _event in self._store.events():
                    self._wake.set()
            except CoordinationUnavailable:
                pass
            except Exception as exc:  # noqa: BLE001 - a dropped subscription is routine
                log.debug("event subscription dropped: %s", exc)
            # The timer keeps the table fresh meanwhile; subscribe again shortly.
            await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        await self._tasks.aclose()
