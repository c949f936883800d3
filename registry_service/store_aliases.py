"""Aliases and their history in the registry database: plain functions of a `db.Tx`, run by
`Database.run` / `Database.read`. They read and write; whether an alias may move is decided in
`rules`."""

from __future__ import annotations

import sqlite3
from typing import Any

from registry_service import store_models
from registry_service.db import Tx
from registry_service.records import AliasRecord, HistoryEntry, MoveKind

__all__ = [
    "alias_map",
    "alias_state",
    "aliases_at",
    "all_alias_states",
    "bump_epoch",
    "find_alias",
    "last_move_from",
    "list_alias_history",
    "move_by_request_id",
    "record_move",
    "write_alias",
]


def alias_map(tx: Tx, model: str) -> dict[str, int]:
    """A model's aliases and the version each points at."""
    rows = tx.execute("SELECT alias, version FROM aliases WHERE model = ?", (model,))
    return {row["alias"]: row["version"] for row in rows}


def find_alias(tx: Tx, model: str, alias: str) -> AliasRecord | None:
    """One alias of a model; None when it does not exist."""
    row = tx.execute("SELECT * FROM aliases WHERE model = ? AND alias = ?", (model, alias)).fetchone()
    return (
        AliasRecord(name=row["alias"], version=row["version"], update_time=row["update_time"])
        if row
        else None
    )


def aliases_at(tx: Tx, model: str, version: int) -> list[str]:
    """The aliases of a model that point at `version`, sorted."""
    return [
        r["alias"]
        for r in tx.execute(
            "SELECT alias FROM aliases WHERE model = ? AND version = ? ORDER BY alias", (model, version)
        )
    ]


def write_alias(tx: Tx, model: str, alias: str, version: int, update_time: float) -> None:
    """Create the alias or point it at `version`."""
    tx.execute(
        "INSERT INTO aliases (model, alias, version, update_time) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, "
        "update_time = excluded.update_time",
        (model, alias, version, update_time),
    )


def record_move(
    tx: Tx,
    model: str,
    alias: str,
    from_version: int,
    to_version: int,
    *,
    epoch: int,
    reason: str,
    actor: str,
    request_id: str,
    time: float,
    kind: MoveKind,
) -> None:
    """Append a move to the alias history."""
    tx.execute(
        "INSERT INTO alias_history (model, alias, from_version, to_version, epoch, reason, "
        "actor, request_id, time, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (model, alias, from_version, to_version, epoch, reason, actor, request_id, time, kind.value),
    )


def move_by_request_id(tx: Tx, model: str, request_id: str) -> HistoryEntry | None:
    """The move of a model's aliases made with this request id, if any."""
    row = tx.execute(
        "SELECT * FROM alias_history WHERE model = ? AND request_id = ?", (model, request_id)
    ).fetchone()
    return _entry_from(row) if row is not None else None


def last_move_from(tx: Tx, model: str, alias: str) -> int:
    """What the alias pointed at before its last move (0: nothing, or it never moved)."""
    row = tx.execute(
        "SELECT from_version FROM alias_history WHERE model = ? AND alias = ? ORDER BY id DESC LIMIT 1",
        (model, alias),
    ).fetchone()
    return row["from_version"] if row is not None else 0


def list_alias_history(
    tx: Tx,
    model: str,
    alias: str = "",
    *,
    page_size: int = 100,
    before_id: int = 0,
    kind: MoveKind | None = None,
) -> list[HistoryEntry]:
    """Moves of a model's aliases (of one alias if named, of one kind if given), newest
    first, with ids below `before_id` when it is set. Raises ModelNotFound."""
    store_models.require_model(tx, model)
    query = "SELECT * FROM alias_history WHERE model = ?"
    args: list[Any] = [model]
    if alias:
        query += " AND alias = ?"
        args.append(alias)
    if kind is not None:
        query += " AND kind = ?"
        args.append(kind.value)
    if before_id:
        query += " AND id < ?"
        args.append(before_id)
    query += " ORDER BY id DESC LIMIT ?"
    args.append(page_size)
    return [_entry_from(r) for r in tx.execute(query, args)]


def alias_state(tx: Tx, model: str) -> tuple[dict[str, int], int]:
    """A model's alias map and epoch. Raises ModelNotFound."""
    epoch = store_models.epoch(tx, model)
    return alias_map(tx, model), epoch


def all_alias_states(tx: Tx) -> dict[str, tuple[dict[str, int], int]]:
    """Alias map and epoch of every model whose aliases ever changed (epoch > 0)."""
    states: dict[str, tuple[dict[str, int], int]] = {
        row["name"]: ({}, row["epoch"])
        for row in tx.execute("SELECT name, epoch FROM models WHERE epoch > 0")
    }
    for row in tx.execute("SELECT model, alias, version FROM aliases"):
        if row["model"] in states:
            states[row["model"]][0][row["alias"]] = row["version"]
    return states


def bump_epoch(tx: Tx, model: str, *, above: int) -> tuple[dict[str, int], int]:
    """Raise a model's epoch past `above` (a Redis that is ahead of this database, e.g.
    after a restore from backup), so the next write to Redis is accepted.

    Returns:
        The model's alias map and its new epoch.
    """
    epoch = max(store_models.epoch(tx, model), above) + 1
    store_models.set_epoch(tx, model, epoch)
    return alias_map(tx, model), epoch


def _entry_from(r: sqlite3.Row) -> HistoryEntry:
    return HistoryEntry(
        id=r["id"],
        model=r["model"],
        alias=r["alias"],
        from_version=r["from_version"],
        to_version=r["to_version"],
        epoch=r["epoch"],
        reason=r["reason"],
        actor=r["actor"],
        request_id=r["request_id"],
        time=r["time"],
        kind=MoveKind(r["kind"]),
    )
