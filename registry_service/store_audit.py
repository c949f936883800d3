"""The audit log in the registry database: plain functions of a `db.Tx`, run by
`Database.run` / `Database.read`. Each entry is sealed into the hash chain of
`modelyard.audit_chain` as it is appended."""

from __future__ import annotations

import dataclasses
from typing import Any

from modelyard import audit_chain
from registry_service.db import Tx
from registry_service.records import AuditFilter, AuditRecord

__all__ = ["add_audit", "list_audit"]


def add_audit(tx: Tx, record: AuditRecord) -> int:
    """Append to the audit log; returns the entry's id. Run it with `Database.run`: sealing
    needs the write lock (see below)."""
    # The chain hashes whole microseconds; storing exactly those keeps the REAL column,
    # the API's Timestamp and the hash in agreement.
    time_us = audit_chain.micros(record.time)
    # Inserted first for its id (which the hash covers) and sealed in the same IMMEDIATE
    # transaction: no other writer can append between reading the previous hash and
    # writing this one.
    cursor = tx.execute(
        "INSERT INTO audit_log (time, actor, method, model, target, request_id, outcome, "
        "error_reason, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            audit_chain.unix_seconds(time_us),
            record.actor,
            record.method,
            record.model,
            record.target,
            record.request_id,
            record.outcome,
            record.error_reason,
            record.message,
        ),
    )
    entry_id = int(cursor.lastrowid or 0)
    previous = tx.execute(
        "SELECT entry_hash FROM audit_log WHERE id < ? ORDER BY id DESC LIMIT 1", (entry_id,)
    ).fetchone()
    # After rows of an older registry (no hash), the chain starts again from genesis;
    # the verifier accepts unchained rows only before the first chained one.
    prev_hash = previous["entry_hash"] if previous is not None else ""
    sealed = audit_chain.seal(
        _audit_chain_entry(dataclasses.replace(record, id=entry_id), time_us),
        prev_hash or audit_chain.GENESIS_HASH,
    )
    tx.execute(
        "UPDATE audit_log SET prev_hash = ?, entry_hash = ? WHERE id = ?",
        (sealed.prev_hash, sealed.entry_hash, entry_id),
    )
    return entry_id


def list_audit(tx: Tx, where: AuditFilter, *, page_size: int = 100, before_id: int = 0) -> list[AuditRecord]:
    """Audit entries matching `where`, newest first, with ids below `before_id` if set."""
    query = "SELECT * FROM audit_log WHERE 1 = 1"
    args: list[Any] = []
    for column in ("model", "method", "outcome"):
        value = getattr(where, column)
        if value:
            query += f" AND {column} = ?"
            args.append(value)
    if where.actor:
        # The whole name as recorded, or a bare name: its key, its service, and the caller
        # so named with access control off ("monitor (claimed; access control off) at
        # ...", "anonymous (access control off) at ...").
        query += " AND (actor IN (?, ?, ?) OR substr(actor, 1, ?) = ?)"
        labelled = f"{where.actor} ("
        args += [where.actor, f"key:{where.actor}", f"service:{where.actor}", len(labelled), labelled]
    if where.start_time:
        query += " AND time >= ?"
        args.append(where.start_time)
    if before_id:
        query += " AND id < ?"
        args.append(before_id)
    query += " ORDER BY id DESC LIMIT ?"
    args.append(page_size)
    return [
        AuditRecord(
            id=r["id"],
            time=r["time"],
            actor=r["actor"],
            method=r["method"],
            model=r["model"],
            target=r["target"],
            request_id=r["request_id"],
            outcome=r["outcome"],
            error_reason=r["error_reason"],
            message=r["message"],
            prev_hash=r["prev_hash"],
            entry_hash=r["entry_hash"],
        )
        for r in tx.execute(query, args)
    ]


def _audit_chain_entry(record: AuditRecord, time_us: int) -> audit_chain.ChainEntry:
    return audit_chain.ChainEntry(
        id=record.id,
        time_us=time_us,
        actor=record.actor,
        method=record.method,
        model=record.model,
        target=record.target,
        request_id=record.request_id,
        outcome=record.outcome,
        error_reason=record.error_reason,
        message=record.message,
    )
