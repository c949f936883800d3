"""The audit log's hash chain (store_audit) on a real SQLite file: every append is sealed to
the one before it (under concurrency too), time survives SQLite and the API to the microsecond,
and a database from before the chain is upgraded with its old rows reported as not covered."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelyard.audit_chain import GENESIS_HASH, entry_from_proto, entry_from_row, verify_chain
from registry_service import convert, store_audit
from registry_service.db import SCHEMA_VERSION, Database
from registry_service.records import AuditFilter, AuditRecord


def record(n: int, *, time: float = 1_760_000_000.123456789) -> AuditRecord:
    return AuditRecord(
        time=time + n,
        actor=f"user-{n % 3}",
        method="SetAlias",
        model="demo",
        target=f"alias production -> {n}",
        request_id=f"r{n}",
        outcome="OK" if n % 2 else "ABORTED",
        error_reason="" if n % 2 else "CONFLICT",
        message=f"call {n} — ünïcode",
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Database]:
    opened = await Database(tmp_path / "registry.sqlite3").open()
    yield opened
    await opened.aclose()


async def all_entries(store: Database) -> list[AuditRecord]:
    return list(reversed(await store.read(store_audit.list_audit, AuditFilter(), page_size=10_000)))


async def test_each_entry_is_sealed_to_the_one_before(store: Database) -> None:
    ids = [await store.run(store_audit.add_audit, record(n)) for n in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    entries = await all_entries(store)
    assert entries[0].prev_hash == GENESIS_HASH
    for before, after in zip(entries, entries[1:], strict=False):
        assert after.prev_hash == before.entry_hash and len(after.entry_hash) == 64
    # Verified the way the CLI does: through the API's messages, and from the file's rows.
    report = verify_chain(entry_from_proto(convert.audit_to_proto(e)) for e in entries)
    assert report.intact and report.head is not None and report.head.id == 5
    conn = sqlite3.connect(store.path)
    conn.row_factory = sqlite3.Row
    rows = [entry_from_row(dict(r)) for r in conn.execute("SELECT * FROM audit_log")]
    conn.close()
    assert verify_chain(rows) == report


async def test_concurrent_appends_form_one_chain(store: Database) -> None:
    await asyncio.gather(*(store.run(store_audit.add_audit, record(n)) for n in range(30)))
    report = verify_chain(entry_from_proto(convert.audit_to_proto(e)) for e in await all_entries(store))
    assert report.intact and report.entries == 30


async def test_time_is_kept_to_the_microsecond_through_sqlite_and_the_api(store: Database) -> None:
    await store.run(store_audit.add_audit, record(0, time=1_760_000_000.1234567))
    [stored] = await all_entries(store)
    assert stored.time == 1_760_000_000.123457
    message = convert.audit_to_proto(stored)
    assert (message.time.seconds, message.time.nanos) == (1_760_000_000, 123_457_000)
    assert entry_from_proto(message).time_us == 1_760_000_000_123_457


async def test_an_old_database_keeps_its_rows_unchained_and_chains_new_ones(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    await (await Database(path).open()).aclose()
    # What a registry from before the chain left: the same schema version, no hash columns.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        """
        DROP TABLE audit_log;
        CREATE TABLE audit_log (
            id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, actor TEXT NOT NULL,
            method TEXT NOT NULL, model TEXT NOT NULL, target TEXT NOT NULL,
            request_id TEXT NOT NULL, outcome TEXT NOT NULL, error_reason TEXT NOT NULL,
            message TEXT NOT NULL);
        INSERT INTO audit_log (time, actor, method, model, target, request_id, outcome,
            error_reason, message) VALUES
            (1.5, 'a', 'CreateModel', 'demo', 'model', 'r1', 'OK', '', ''),
            (2.5, 'b', 'SetAlias', 'demo', 'alias', 'r2', 'OK', '', '');
        """
    )
    conn.close()

    store = await Database(path).open()
    try:
        await store.run(store_audit.add_audit, record(3))
        await store.run(store_audit.add_audit, record(4))
        entries = await all_entries(store)
    finally:
        await store.aclose()
    assert [(e.id, e.entry_hash == "") for e in entries] == [(1, True), (2, True), (3, False), (4, False)]
    assert entries[2].prev_hash == GENESIS_HASH
    report = verify_chain(entry_from_proto(convert.audit_to_proto(e)) for e in entries)
    assert report.intact, report.problem
    assert (report.not_covered, report.not_covered_through) == (2, 2)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
