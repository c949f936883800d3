"""The registry's API keys: stored (hashes only), changed, and published to the cluster.

Keys live in their own SQLite file (`<data_dir>/keys.sqlite3`, owner-only), apart from the
models: a backup of the model registry never carries credentials, and the key table has one
writer, `ApiKeys`. Every change bumps the keys' epoch and publishes the whole set of active
keys to Redis (`CoordinationStore.apply_access_keys`), from where gateways and the monitor
load it (`modelyard.access.KeySync`); the registry's own `KeyBook` is updated in the same step.

A revoked key stays in the table (with its revoke time) for the audit and `keys list`; what is
published is only the active keys, so a revocation is a record that disappears.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from modelyard.access.grants import Grants, InvalidGrant
from modelyard.access.keys import KeyBook, KeyRecord, hash_token, key_id_of, new_key_token
from modelyard.coordination import CoordinationStore
from modelyard.errors import AlreadyExists, CoordinationUnavailable, InvalidArgument, NotFound
from modelyard.tls import write_private

__all__ = ["ApiKey", "ApiKeys", "KeyStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id          TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    token_hash      TEXT NOT NULL,
    grants          TEXT NOT NULL,   -- JSON list of grant strings
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL,   -- 0: never
    revoked_at      REAL NOT NULL,   -- 0: active; may lie ahead (a rotation's overlap)
    created_by      TEXT NOT NULL,
    rate_per_s      REAL NOT NULL,
    max_concurrency INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS access_meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One key as stored."""

    key_id: str
    name: str
    token_hash: str
    grants: tuple[str, ...]
    created_at: float
    expires_at: float = 0.0
    revoked_at: float = 0.0
    created_by: str = ""
    rate_per_s: float = 0.0
    max_concurrency: int = 0

    def active(self, now: float) -> bool:
        return (not self.revoked_at or now < self.revoked_at) and (
            not self.expires_at or now < self.expires_at
        )

    def published(self) -> KeyRecord:
        """What services are told: the key stops being valid at its expiry or revoke time,
        whichever comes first, even before the next publication."""
        ends = [t for t in (self.expires_at, self.revoked_at) if t]
        return KeyRecord(
            key_id=self.key_id,
            name=self.name,
            token_hash=self.token_hash,
            grants=self.grants,
            expires_at=min(ends) if ends else 0.0,
            rate_per_s=self.rate_per_s,
            max_concurrency=self.max_concurrency,
        )


class KeyStore:
    """The key table, on one thread of its own (sqlite3 connections are not shared)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> KeyStore:
        await asyncio.to_thread(self._connect)
        return self

    async def aclose(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.to_thread(conn.close)

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if not self._path.exists():
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._conn is None:
            raise RuntimeError("Cannot use a KeyStore that is not open.")
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return fn(*args)

    async def all(self) -> tuple[list[ApiKey], int]:
        """Every key, oldest first, and the epoch."""
        return await self._run(self._all)

    async def insert(self, key: ApiKey) -> int:
        """Add a key (its name must not be taken by an active key); the new epoch."""
        return await self._run(self._insert, key)

    async def revoke(self, key_id: str, at: float) -> tuple[ApiKey, int]:
        return await self._run(self._revoke, key_id, at)

    async def rotate(self, old_id: str, new: ApiKey, revoke_at: float) -> tuple[ApiKey, int]:
        """Add `new` and revoke `old_id` at `revoke_at`, in one transaction."""
        return await self._run(self._rotate, old_id, new, revoke_at)

    def _epoch(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT value FROM access_meta WHERE name = 'epoch'").fetchone()
        return int(row[0]) if row else 0

    def _bump(self, conn: sqlite3.Connection) -> int:
        epoch = self._epoch(conn) + 1
        conn.execute(
            "INSERT INTO access_meta (name, value) VALUES ('epoch', ?)"
            " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (epoch,),
        )
        return epoch

    def _all(self) -> tuple[list[ApiKey], int]:
        assert self._conn is not None
        rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created_at, key_id").fetchall()
        return [_key_from(row) for row in rows], self._epoch(self._conn)

    def _insert_in(self, conn: sqlite3.Connection, key: ApiKey) -> None:
        now = time.time()
        for row in conn.execute("SELECT * FROM api_keys WHERE name = ?", (key.name,)).fetchall():
            if _key_from(row).active(now) and not row["revoked_at"]:
                raise AlreadyExists(f"an active API key is named {key.name!r}; revoke or rotate it")
        _insert_row(conn, key)

    def _insert(self, key: ApiKey) -> int:
        assert self._conn is not None
        with _transaction(self._conn) as conn:
            self._insert_in(conn, key)
            return self._bump(conn)

    def _get(self, conn: sqlite3.Connection, key_id: str) -> ApiKey:
        row = conn.execute("SELECT * FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id[:64]!r}")
        return _key_from(row)

    def _revoke(self, key_id: str, at: float) -> tuple[ApiKey, int]:
        assert self._conn is not None
        with _transaction(self._conn) as conn:
            key = self._get(conn, key_id)
            if not key.revoked_at or key.revoked_at > at:
                conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (at, key_id))
                key = replace(key, revoked_at=at)
            return key, self._bump(conn)

    def _rotate(self, old_id: str, new: ApiKey, revoke_at: float) -> tuple[ApiKey, int]:
        assert self._conn is not None
        with _transaction(self._conn) as conn:
            old = self._get(conn, old_id)
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ?", (revoke_at, old_id))
            old = replace(old, revoked_at=revoke_at)
            # The old key is being revoked, so the name is free for the new one.
            _insert_row(conn, replace(new, revoked_at=0.0))
            return old, self._bump(conn)


def _insert_row(conn: sqlite3.Connection, key: ApiKey) -> None:
    conn.execute(
        "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key.key_id,
            key.name,
            key.token_hash,
            json.dumps(list(key.grants)),
            key.created_at,
            key.expires_at,
            key.revoked_at,
            key.created_by,
            key.rate_per_s,
            key.max_concurrency,
        ),
    )


class _transaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _key_from(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        name=row["name"],
        token_hash=row["token_hash"],
        grants=tuple(json.loads(row["grants"])),
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        created_by=row["created_by"],
        rate_per_s=row["rate_per_s"],
        max_concurrency=row["max_concurrency"],
    )


class ApiKeys:
    """Key management: the one writer of the key table and of the published keys.

    Args:
        store: The key table.
        coordination: Where keys are published for the other services.
        book: The registry's own book, updated with every change.
    """

    def __init__(self, store: KeyStore, coordination: CoordinationStore, book: KeyBook) -> None:
        self._store = store
        self._coordination = coordination
        self.book = book
        self._published_epoch = -1

    async def load(self) -> None:
        """Fill the registry's book from the table (Redis not needed)."""
        keys, epoch = await self._store.all()
        self._set_book(keys, epoch)

    def _set_book(self, keys: list[ApiKey], epoch: int) -> list[KeyRecord]:
        now = time.time()
        records = [k.published() for k in keys if k.active(now)]
        self.book.replace(records, epoch=epoch)
        return records

    async def all_keys(self) -> list[ApiKey]:
        keys, _ = await self._store.all()
        return keys

    async def create(
        self,
        name: str,
        grants: list[str],
        *,
        ttl_s: float = 0.0,
        rate_per_s: float = 0.0,
        max_concurrency: int = 0,
        created_by: str = "",
        token: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Make a key; its token is returned this once. `token`: adopt one made elsewhere
        (the bootstrap admin key from a secret)."""
        if _NAME.fullmatch(name) is None:
            raise InvalidArgument(
                "a key name is 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit",
                field="name",
            )
        _check_grants(grants)
        if ttl_s < 0 or rate_per_s < 0 or max_concurrency < 0:
            raise InvalidArgument("ttl, rate and concurrency must not be negative")
        if token is None:
            key_id, token = new_key_token()
        else:
            found = key_id_of(token)
            if found is None:
                raise InvalidArgument(
                    "the given token is not a Modelyard API key (myk_<12 chars>_<43 chars>)"
                )
            key_id = found
        now = time.time()
        key = ApiKey(
            key_id=key_id,
            name=name,
            token_hash=hash_token(token),
            grants=tuple(grants),
            created_at=now,
            expires_at=now + ttl_s if ttl_s else 0.0,
            created_by=created_by,
            rate_per_s=rate_per_s,
            max_concurrency=max_concurrency,
        )
        await self._store.insert(key)
        await self.publish()
        return key, token

    async def _find(self, key: str) -> ApiKey:
        now = time.time()
        keys = await self.all_keys()
        for candidate in keys:
            if candidate.key_id == key:
                return candidate
        named = [k for k in keys if k.name == key and k.active(now)]
        if not named:
            raise NotFound(f"no API key with id or active name {key[:64]!r}")
        return named[-1]

    async def revoke(self, key: str) -> ApiKey:
        found = await self._find(key)
        revoked, _ = await self._store.revoke(found.key_id, time.time())
        await self.publish()
        return revoked

    async def rotate(
        self, key: str, *, overlap_s: float = 0.0, created_by: str = ""
    ) -> tuple[ApiKey, str, ApiKey]:
        if overlap_s < 0:
            raise InvalidArgument("overlap must not be negative", field="overlap_seconds")
        old = await self._find(key)
        key_id, token = new_key_token()
        now = time.time()
        new = replace(
            old,
            key_id=key_id,
            token_hash=hash_token(token),
            created_at=now,
            expires_at=now + (old.expires_at - old.created_at) if old.expires_at else 0.0,
            revoked_at=0.0,
            created_by=created_by,
        )
        previous, _ = await self._store.rotate(old.key_id, new, now + overlap_s)
        await self.publish()
        return new, token, previous

    async def publish(self) -> bool:
        """Update the registry's book and publish the active keys; False when Redis is down
        (the resync loop tries again)."""
        keys, epoch = await self._store.all()
        records = self._set_book(keys, epoch)
        try:
            await self._coordination.apply_access_keys(
                {r.key_id: json.dumps(r.to_json(), separators=(",", ":")) for r in records}, epoch
            )
        except CoordinationUnavailable as exc:
            log.warning("cannot publish the API keys yet: %s", exc)
            return False
        self._published_epoch = epoch
        return True

    async def resync_forever(self, interval_s: float) -> None:
        """Republish when Redis lost the keys (restart, FLUSHALL) or missed a change, and
        drop expired keys from the books."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                published = await self._coordination.access_epoch()
            except CoordinationUnavailable:
                continue
            _, epoch = await self._store.all()
            if published is None or published < epoch or self._published_epoch != epoch:
                await self.publish()

    async def bootstrap_admin(self, *, token: str | None, write_to: Path | None) -> str | None:
        """With no key at all yet, make the `admin` key: from `token` (an operator's secret),
        else a new one written to `write_to` (owner-only). Returns the new token, if any."""
        keys, _ = await self._store.all()
        if keys:
            return None
        _, made = await self.create("admin", ["admin"], created_by="bootstrap", token=token)
        if write_to is not None and token is None:
            write_private(write_to, made.encode())
            log.info("made the admin API key; it is in %s", write_to)
        return made


def _check_grants(grants: list[str]) -> None:
    if not grants:
        raise InvalidArgument("a key needs at least one grant, such as predict:* or admin", field="grants")
    try:
        Grants.parse(grants)
    except InvalidGrant as exc:
        raise InvalidArgument(str(exc), field="grants") from None
