"""Keeps a service's `KeyBook` equal to the keys the registry published in Redis.

The registry writes the whole set of key records (hashes, grants, expiry, limits; never a
secret) with an epoch that only grows (`CoordinationStore.apply_access_keys`). Every
`interval_s` a service reads the epoch (one GET) and, when it moved, the whole set in one
transaction. So a revocation is enforced everywhere within about `interval_s`.

Fail closed: the book starts empty (every API key unknown), and while Redis is down or has
lost its data (FLUSHALL: no epoch) the last good copy stays: known keys keep working, unknown
ones stay refused, until the registry publishes again.
"""

from __future__ import annotations

import asyncio
import json
import logging

from prometheus_client import Gauge

from modelyard.access.keys import KeyBook, KeyRecord
from modelyard.coordination import CoordinationStore
from modelyard.errors import CoordinationUnavailable

__all__ = ["KeySync", "ACCESS_EPOCH"]

log = logging.getLogger(__name__)

ACCESS_EPOCH = Gauge("modelyard_access_keys_epoch", "Epoch of the API keys this service enforces.")


def records_from(raw: dict[str, str]) -> list[KeyRecord]:
    """Parse published records; a malformed one is skipped (that key is refused)."""
    records = []
    for key_id, text in raw.items():
        try:
            record = KeyRecord.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError):
            log.warning("skipping the malformed API key record %s in Redis", key_id[:40])
            continue
        if record.key_id == key_id:
            records.append(record)
    return records


class KeySync:
    """Polls Redis for the API keys into `book`.

    Usage::

        sync = KeySync(store, book, interval_s=0.5)
        await sync.refresh()          # once at start-up (errors logged, book left as is)
        tasks.spawn("key-sync", sync.run_forever)
    """

    def __init__(self, store: CoordinationStore, book: KeyBook, *, interval_s: float) -> None:
        self._store = store
        self.book = book
        self._interval_s = interval_s
        self._unreachable = False

    async def refresh(self) -> bool:
        """Read the keys if their epoch moved; True when the book changed."""
        try:
            epoch = await self._store.access_epoch()
            if epoch is None or epoch == self.book.epoch:
                return False
            epoch, raw = await self._store.access_keys()
        except CoordinationUnavailable as exc:
            if not self._unreachable:
                log.warning("cannot read the API keys (keeping the last %d): %s", len(self.book), exc)
            self._unreachable = True
            return False
        if self._unreachable:
            log.info("reading the API keys from Redis again")
            self._unreachable = False
        if epoch is None or epoch < self.book.epoch:
            # Lost (FLUSHALL) or rolled back: keep what we had until the registry republishes.
            return False
        self.book.replace(records_from(raw), epoch=epoch)
        ACCESS_EPOCH.set(epoch)
        return True

    async def run_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._interval_s)
