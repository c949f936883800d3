"""The registry's durable metadata: one SQLite file, the source of truth for models, versions
and aliases.

Every statement runs on one dedicated thread with one connection, so calls are serialised
without a lock and the event loop never blocks on disk. Mutations run in `BEGIN IMMEDIATE`
transactions (the write lock is taken up front, so a compare-and-set cannot be raced by another
process opening the same file either). The journal is WAL with `synchronous=FULL`: a commit
survives a kill -9 *and* a power cut. FULL matters here: if a committed alias move were lost
after Redis had already seen its epoch, Redis would be ahead of its own source of truth.

A version row is inserted only after its artifact is safely in place (see `registry.py`), so
a crash at any point leaves either no row, or a row whose file exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from modelyard.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    VersionNotFound,
)
from modelyard.v1 import tensor_pb2
from registry_service.records import (
    AliasChange,
    AliasRecord,
    ArtifactFormat,
    ModelRecord,
    UploadMetadata,
    VersionRecord,
    VersionState,
)

__all__ = ["RegistryStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
"""Kept in `PRAGMA user_version`; a database from a newer registry is refused, not guessed at."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name           TEXT PRIMARY KEY,
    description    TEXT    NOT NULL,
    create_time    REAL    NOT NULL,
    latest_version INTEGER NOT NULL DEFAULT 0,
    epoch          INTEGER NOT NULL DEFAULT 0,
    request_id     TEXT    NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS versions (
    model       TEXT    NOT NULL REFERENCES models(name),
    version     INTEGER NOT NULL,
    format      TEXT    NOT NULL,
    sha256      TEXT    NOT NULL,
    size_bytes  INTEGER NOT NULL,
    signature   BLOB    NOT NULL,  -- a serialized modelyard.v1.Signature
    description TEXT    NOT NULL,
    labels      TEXT    NOT NULL,  -- JSON object of strings
    metrics     TEXT    NOT NULL,  -- JSON object of numbers
    created_by  TEXT    NOT NULL,
    create_time REAL    NOT NULL,
    state       TEXT    NOT NULL,
    request_id  TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (model, version)
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_by_request_id
    ON versions (model, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS versions_by_sha256 ON versions (sha256);
CREATE TABLE IF NOT EXISTS aliases (
    model       TEXT    NOT NULL REFERENCES models(name),
    alias       TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    update_time REAL    NOT NULL,
    PRIMARY KEY (model, alias),
    FOREIGN KEY (model, version) REFERENCES versions (model, version)
);
CREATE TABLE IF NOT EXISTS alias_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    model        TEXT    NOT NULL REFERENCES models(name),
    alias        TEXT    NOT NULL,
    from_version INTEGER NOT NULL,  -- 0: the alias did not exist
    to_version   INTEGER NOT NULL,
    epoch        INTEGER NOT NULL,  -- the model's epoch after the move
    reason       TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    request_id   TEXT    NOT NULL,
    time         REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS alias_history_by_alias ON alias_history (model, alias, id);
CREATE UNIQUE INDEX IF NOT EXISTS alias_history_by_request_id
    ON alias_history (model, request_id) WHERE request_id != '';
"""

T = TypeVar("T")


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class RegistryStore:
    """Async access to the registry's SQLite database.

    Usage::

        store = await RegistryStore(settings.resolved_database_path).open()
        model = await store.create_model("demo", "an MLP")
        ...
        await store.aclose()

    Methods raise the domain errors of `modelyard.errors` (ModelNotFound, Conflict, ...);
    names are validated by the caller (`registry.Registry`).
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
        self._state = _State.UNOPENED
        # One thread owns the connection: sqlite3 objects must stay on the thread that made them,
        # and a single writer is what SQLite supports anyway.
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    async def open(self) -> RegistryStore:
        """Create or migrate the database and connect.

        Raises:
            RuntimeError: opened twice, or the database was written by a newer registry.
        """
        if self._state is not _State.UNOPENED:
            raise RuntimeError("Cannot open a RegistryStore more than once.")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")
        self._state = _State.OPENED
        try:
            await self._run(self._connect)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Close the connection (after calls already queued). Safe to call twice."""
        opened = self._state is _State.OPENED
        # Closed first: a call arriving while the connection closes fails clearly, not on None.
        self._state = _State.CLOSED
        if opened and self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
            self._executor.shutdown(wait=False)

    # -- models ----------------------------------------------------------------------------

    async def create_model(self, name: str, description: str, *, request_id: str = "") -> ModelRecord:
        """Create a model.

        Raises:
            AlreadyExists: the name is taken (unless by an earlier call with this request id,
                whose model is then returned).
        """
        return await self._run(self._create_model, name, description, request_id)

    async def get_model(self, name: str) -> ModelRecord:
        """A model with its aliases. Raises ModelNotFound."""
        return await self._run(self._get_model, name)

    async def list_models(self) -> list[ModelRecord]:
        """Every model with its aliases, sorted by name."""
        return await self._run(self._list_models)

    # -- versions --------------------------------------------------------------------------

    async def insert_version(
        self, metadata: UploadMetadata, *, sha256: str, size_bytes: int, created_by: str
    ) -> VersionRecord:
        """Record a new version, numbered after the model's latest. Its artifact must be stored.

        A request id already used for this model returns that version instead of a new one.

        Raises:
            ModelNotFound: the model does not exist.
            InvalidArgument: the request id was used for a different artifact.
        """
        assert metadata.format is not None, "validated by the registry"
        return await self._run(self._insert_version, metadata, sha256, size_bytes, created_by)

    async def get_version(self, model: str, version: int) -> VersionRecord:
        """One version. Raises ModelNotFound or VersionNotFound."""
        return await self._run(self._get_version, model, version)

    async def list_versions(self, model: str) -> list[VersionRecord]:
        """A model's versions, oldest first. Raises ModelNotFound."""
        return await self._run(self._list_versions, model)

    # -- aliases ---------------------------------------------------------------------------

    async def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
    ) -> AliasChange:
        """Point `alias` at `version` in one transaction: compare, move, record, bump the epoch.

        Args:
            expected_version: What the alias must point at now (0: must not exist);
                None moves it whatever it points at.

        Raises:
            ModelNotFound / VersionNotFound: the model or version does not exist.
            FailedPrecondition: the version is archived.
            Conflict: the alias does not point at `expected_version`.
            InvalidArgument: the request id was used for a different move.
        """
        return await self._run(
            self._set_alias, model, alias, version, expected_version, reason, actor, request_id
        )

    async def alias_state(self, model: str) -> tuple[dict[str, int], int]:
        """A model's alias map and epoch. Raises ModelNotFound."""
        return await self._run(self._alias_state, model)

    async def all_alias_states(self) -> dict[str, tuple[dict[str, int], int]]:
        """Alias map and epoch of every model whose aliases ever changed (epoch > 0)."""
        return await self._run(self._all_alias_states)

    async def bump_epoch(self, model: str, *, above: int) -> tuple[dict[str, int], int]:
        """Raise a model's epoch past `above` (a Redis that is ahead of this database, e.g.
        after a restore from backup), so the next write to Redis is accepted.

        Returns:
            The model's alias map and its new epoch.
        """
        return await self._run(self._bump_epoch, model, above)

    # -- plumbing --------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._state is _State.UNOPENED:
            raise RuntimeError("Cannot use a RegistryStore before open().")
        if self._state is _State.CLOSED or self._executor is None:
            raise RuntimeError("Cannot use a RegistryStore after aclose().")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    def _connect(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; every mutation says BEGIN IMMEDIATE.
        conn = sqlite3.connect(self._path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self._path} has schema version {found}, newer than this registry's "
                    f"{SCHEMA_VERSION}; run a registry at least as new as the one that wrote it"
                )
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        conn = self._conn
        assert conn is not None, "opened"
        conn.execute(f"BEGIN {mode}")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # A deferred transaction gives multi-statement reads one consistent snapshot.
        return self._transaction("DEFERRED")

    # -- on the database thread ------------------------------------------------------------

    def _create_model(self, name: str, description: str, request_id: str) -> ModelRecord:
        with self._transaction() as conn:
            row = conn.execute("SELECT request_id FROM models WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO models (name, description, create_time, request_id) VALUES (?, ?, ?, ?)",
                    (name, description, self._clock(), request_id),
                )
            elif not request_id or row["request_id"] != request_id:
                raise AlreadyExists(
                    f"model {name!r} already exists; pick another name or upload versions to it",
                    field="name",
                )
            return self._model_in(conn, name)

    def _get_model(self, name: str) -> ModelRecord:
        with self._read() as conn:
            return self._model_in(conn, name)

    def _list_models(self) -> list[ModelRecord]:
        with self._read() as conn:
            aliases: dict[str, list[AliasRecord]] = {}
            for row in conn.execute("SELECT * FROM aliases ORDER BY model, alias"):
                aliases.setdefault(row["model"], []).append(_alias_from(row))
            return [
                _model_from(row, aliases.get(row["name"], []))
                for row in conn.execute("SELECT * FROM models ORDER BY name")
            ]

    def _model_in(self, conn: sqlite3.Connection, name: str) -> ModelRecord:
        row = conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise _model_not_found(name)
        aliases = conn.execute("SELECT * FROM aliases WHERE model = ? ORDER BY alias", (name,)).fetchall()
        return _model_from(row, [_alias_from(a) for a in aliases])

    def _insert_version(
        self, metadata: UploadMetadata, sha256: str, size_bytes: int, created_by: str
    ) -> VersionRecord:
        assert metadata.format is not None
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT latest_version FROM models WHERE name = ?", (metadata.model,)
            ).fetchone()
            if row is None:
                raise _model_not_found(metadata.model)
            if metadata.request_id:
                earlier = conn.execute(
                    "SELECT * FROM versions WHERE model = ? AND request_id = ?",
                    (metadata.model, metadata.request_id),
                ).fetchone()
                if earlier is not None:
                    if earlier["sha256"] != sha256:
                        raise InvalidArgument(
                            f"request id {metadata.request_id!r} already uploaded version "
                            f"{earlier['version']} with a different artifact; use a new request id",
                            field="metadata.request_id",
                        )
                    return _version_from(earlier)
            version = row["latest_version"] + 1
            conn.execute(
                "INSERT INTO versions (model, version, format, sha256, size_bytes, signature, "
                "description, labels, metrics, created_by, create_time, state, request_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    metadata.model,
                    version,
                    metadata.format.value,
                    sha256,
                    size_bytes,
                    metadata.signature.SerializeToString(deterministic=True),
                    metadata.description,
                    json.dumps(metadata.labels, sort_keys=True),
                    json.dumps(metadata.metrics, sort_keys=True),
                    created_by,
                    self._clock(),
                    VersionState.ACTIVE.value,
                    metadata.request_id,
                ),
            )
            conn.execute("UPDATE models SET latest_version = ? WHERE name = ?", (version, metadata.model))
            return self._version_in(conn, metadata.model, version)

    def _get_version(self, model: str, version: int) -> VersionRecord:
        with self._read() as conn:
            return self._version_in(conn, model, version)

    def _version_in(self, conn: sqlite3.Connection, model: str, version: int) -> VersionRecord:
        row = conn.execute(
            "SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)
        ).fetchone()
        if row is None:
            self._require_model(conn, model)
            raise VersionNotFound(
                f"model {model!r} has no version {version}; list them with ListModelVersions",
                field="version",
                metadata={"model": model, "version": str(version)},
            )
        return _version_from(row)

    def _list_versions(self, model: str) -> list[VersionRecord]:
        with self._read() as conn:
            self._require_model(conn, model)
            rows = conn.execute(
                "SELECT * FROM versions WHERE model = ? ORDER BY version", (model,)
            ).fetchall()
            return [_version_from(row) for row in rows]

    def _set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        expected_version: int | None,
        reason: str,
        actor: str,
        request_id: str,
    ) -> AliasChange:
        with self._transaction() as conn:
            model_row = conn.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()
            if model_row is None:
                raise _model_not_found(model)
            epoch: int = model_row["epoch"]
            if request_id:
                earlier = conn.execute(
                    "SELECT * FROM alias_history WHERE model = ? AND request_id = ?",
                    (model, request_id),
                ).fetchone()
                if earlier is not None:
                    return self._replayed_move(conn, earlier, alias, version)
            target = self._version_in(conn, model, version)
            if target.state is not VersionState.ACTIVE:
                raise FailedPrecondition(
                    f"version {version} of model {model!r} is {target.state.value}; only active "
                    "versions can be aliased",
                    field="version",
                )
            row = conn.execute(
                "SELECT * FROM aliases WHERE model = ? AND alias = ?", (model, alias)
            ).fetchone()
            current = row["version"] if row is not None else 0
            if expected_version is not None and expected_version != current:
                raise _conflict(model, alias, current, expected_version)
            if row is not None and current == version:
                # Already there: no move, so no history entry and no new epoch.
                return AliasChange(
                    model=model,
                    alias=_alias_from(row),
                    previous_version=current,
                    epoch=epoch,
                    aliases=self._alias_map(conn, model),
                    changed=False,
                )
            now = self._clock()
            epoch += 1
            conn.execute(
                "INSERT INTO aliases (model, alias, version, update_time) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, "
                "update_time = excluded.update_time",
                (model, alias, version, now),
            )
            conn.execute(
                "INSERT INTO alias_history (model, alias, from_version, to_version, epoch, reason, "
                "actor, request_id, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (model, alias, current, version, epoch, reason, actor, request_id, now),
            )
            conn.execute("UPDATE models SET epoch = ? WHERE name = ?", (epoch, model))
            return AliasChange(
                model=model,
                alias=AliasRecord(alias, version, now),
                previous_version=current,
                epoch=epoch,
                aliases=self._alias_map(conn, model),
                changed=True,
            )

    def _replayed_move(
        self, conn: sqlite3.Connection, earlier: sqlite3.Row, alias: str, version: int
    ) -> AliasChange:
        if (earlier["alias"], earlier["to_version"]) != (alias, version):
            raise InvalidArgument(
                f"request id {earlier['request_id']!r} already moved alias {earlier['alias']!r} "
                f"to version {earlier['to_version']}; use a new request id for a different move",
                field="request_id",
            )
        # A retry of a move that was applied: answer as the first call was answered.
        return AliasChange(
            model=earlier["model"],
            alias=AliasRecord(alias, version, earlier["time"]),
            previous_version=earlier["from_version"],
            epoch=earlier["epoch"],
            aliases=self._alias_map(conn, earlier["model"]),
            changed=False,
        )

    def _alias_state(self, model: str) -> tuple[dict[str, int], int]:
        with self._read() as conn:
            row = conn.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()
            if row is None:
                raise _model_not_found(model)
            return self._alias_map(conn, model), row["epoch"]

    def _all_alias_states(self) -> dict[str, tuple[dict[str, int], int]]:
        with self._read() as conn:
            states: dict[str, tuple[dict[str, int], int]] = {
                row["name"]: ({}, row["epoch"])
                for row in conn.execute("SELECT name, epoch FROM models WHERE epoch > 0")
            }
            for row in conn.execute("SELECT model, alias, version FROM aliases"):
                if row["model"] in states:
                    states[row["model"]][0][row["alias"]] = row["version"]
            return states

    def _bump_epoch(self, model: str, above: int) -> tuple[dict[str, int], int]:
        with self._transaction() as conn:
            row = conn.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()
            if row is None:
                raise _model_not_found(model)
            epoch = max(row["epoch"], above) + 1
            conn.execute("UPDATE models SET epoch = ? WHERE name = ?", (epoch, model))
            return self._alias_map(conn, model), epoch

    def _alias_map(self, conn: sqlite3.Connection, model: str) -> dict[str, int]:
        rows = conn.execute("SELECT alias, version FROM aliases WHERE model = ?", (model,))
        return {row["alias"]: row["version"] for row in rows}

    def _require_model(self, conn: sqlite3.Connection, model: str) -> None:
        if conn.execute("SELECT 1 FROM models WHERE name = ?", (model,)).fetchone() is None:
            raise _model_not_found(model)


def _model_not_found(name: str) -> ModelNotFound:
    return ModelNotFound(
        f"model {name!r} does not exist; create it with CreateModel or check the name",
        metadata={"model": name},
    )


def _conflict(model: str, alias: str, current: int, expected: int) -> Conflict:
    now = f"points at version {current}" if current else "does not exist"
    was = f"it to point at version {expected}" if expected else "it not to exist"
    return Conflict(
        f"alias {alias!r} of model {model!r} {now}, but the call expected {was}; it moved since "
        "you read it: re-read it (GetModel) and retry with the new expected_version",
        metadata={"model": model, "alias": alias, "current_version": str(current)},
    )


def _alias_from(row: sqlite3.Row) -> AliasRecord:
    return AliasRecord(name=row["alias"], version=row["version"], update_time=row["update_time"])


def _model_from(row: sqlite3.Row, aliases: list[AliasRecord]) -> ModelRecord:
    return ModelRecord(
        name=row["name"],
        description=row["description"],
        create_time=row["create_time"],
        latest_version=row["latest_version"],
        epoch=row["epoch"],
        aliases=tuple(aliases),
    )


def _version_from(row: sqlite3.Row) -> VersionRecord:
    signature = tensor_pb2.Signature()
    signature.ParseFromString(row["signature"])
    return VersionRecord(
        model=row["model"],
        version=row["version"],
        format=ArtifactFormat(row["format"]),
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        signature=signature,
        description=row["description"],
        labels=json.loads(row["labels"]),
        metrics=json.loads(row["metrics"]),
        created_by=row["created_by"],
        create_time=row["create_time"],
        state=VersionState(row["state"]),
    )
