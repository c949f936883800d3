"""Service membership: every service keeps a record in Redis fresh while it runs.

The record expires `ttl_s` after the last heartbeat, so a crashed process drops out of
routing on its own; a clean shutdown deregisters at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from modelyard.coordination import CoordinationStore, ServiceRecord
from modelyard.errors import CoordinationUnavailable
from modelyard.tasks import cancel_task

__all__ = ["Heartbeat", "new_service_id"]

log = logging.getLogger(__name__)


def new_service_id(kind: str) -> str:
    """A unique, readable id such as "model-server-3f2a9c"."""
    return f"{kind.replace('_', '-')}-{secrets.token_hex(3)}"


class Heartbeat:
    """Writes `record()` to Redis every `interval_s`, and at once after `poke()`.

    Redis being down is not fatal: the loop logs once and keeps trying, so a service rides
    out a Redis restart.
    """

    def __init__(
        self,
        store: CoordinationStore,
        record: Callable[[], ServiceRecord],
        *,
        interval_s: float,
        ttl_s: float,
    ) -> None:
        self._store = store
        self._record = record
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._announced = False
        self._published: tuple[object, ...] | None = None
        self._failing = False
        self.start_time = time.time()

    async def start(self) -> None:
        """Beat once (best effort) and start the loop."""
        await self._beat()
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    def poke(self) -> None:
        """Heartbeat now: what the service holds changed."""
        self._wake.set()

    async def _beat(self) -> None:
        record = self._record()
        try:
            await self._store.heartbeat(record, self._ttl_s)
            # Announce only what routing cares about, not every beat: subscribers resync on
            # each event.
            shape = _routing_shape(record)
            if shape != self._published:
                await self._store.publish_service_change(record.id, "changed" if self._announced else "up")
                self._published = shape
            if not self._announced:
                log.info("registered as %s at %s", record.id, record.address)
            self._announced = True
            if self._failing:
                log.info("heartbeats reach Redis again")
            self._failing = False
        except CoordinationUnavailable as exc:
            if not self._failing:
                log.warning("heartbeat failed, will keep retrying: %s", exc)
            self._failing = True

    async def _run(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancellation that
            # lands during its timeout into a TimeoutError, and this loop would never stop.
            try:
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            await self._beat()

    async def aclose(self, *, deregister: bool = True) -> None:
        """Stop beating and (by default) remove the record so routing forgets us at once."""
        await cancel_task(self._task)
        self._task = None
        if deregister and self._announced:
            try:
                await self._store.deregister(self._record().id)
            except CoordinationUnavailable as exc:
                log.warning("could not deregister (the record will expire): %s", exc)


def _routing_shape(record: ServiceRecord) -> tuple[object, ...]:
    return (
        record.address,
        record.draining,
        tuple(sorted((v.model, v.version, v.state) for v in record.versions)),
    )
