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
import dataclasses
import enum
import functools
import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format

from modelyard import audit_chain
from modelyard.errors import (
    AliasNotFound,
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    VersionNotFound,
)
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service.deployments import apply_update_mask, check_deployment, placed_versions
from registry_service.records import (
    AliasChange,
    AliasRecord,
    ArtifactFormat,
    AuditFilter,
    AuditRecord,
    DeleteOutcome,
    DeploymentChange,
    DeploymentSpec,
    HistoryEntry,
    ImportItem,
    ModelRecord,
    MoveKind,
    RoutingState,
    UploadMetadata,
    VersionOrigin,
    VersionRecord,
    VersionState,
)

__all__ = ["RegistryStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = 8
"""Kept in `PRAGMA user_version`; a database from a newer registry is refused, not guessed at.
2 -> 3 added `versions.input_baselines`, 3 -> 4 `models.require_signature`, `versions.signer`
and `versions.model_signature`, 4 -> 5 `audit_log.prev_hash` and `audit_log.entry_hash` (the
hash chain), 5 -> 6 `alias_history.kind`, 6 -> 7 the `cluster` identity and the
`versions.origin_*` columns of imported versions, 7 -> 8 the `optimization_reports` table
(each upgraded in place on open)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name           TEXT PRIMARY KEY,
    description    TEXT    NOT NULL,
    create_time    REAL    NOT NULL,
    latest_version INTEGER NOT NULL DEFAULT 0,
    epoch          INTEGER NOT NULL DEFAULT 0,
    request_id     TEXT    NOT NULL DEFAULT '',
    require_signature INTEGER NOT NULL DEFAULT 0  -- 1: every version must be signed
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
    input_baselines TEXT NOT NULL DEFAULT '[]',  -- JSON list of modelyard.v1.InputBaseline
    signer      TEXT    NOT NULL DEFAULT '',     -- who signed it, as verified at upload
    model_signature BLOB NOT NULL DEFAULT x'',   -- the OpenSSF model signing bundle (JSON)
    origin_cluster TEXT NOT NULL DEFAULT '',     -- imported: the source cluster's id, else ''
    origin_version INTEGER NOT NULL DEFAULT 0,   -- imported: its number there
    origin_sha256  TEXT NOT NULL DEFAULT '',     -- imported: its sha256 there
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
    time         REAL    NOT NULL,
    kind         TEXT    NOT NULL DEFAULT ''  -- a MoveKind value, '' on moves from before schema 6
);
CREATE INDEX IF NOT EXISTS alias_history_by_alias ON alias_history (model, alias, id);
CREATE UNIQUE INDEX IF NOT EXISTS alias_history_by_request_id
    ON alias_history (model, request_id) WHERE request_id != '';
CREATE TABLE IF NOT EXISTS deployments (
    model       TEXT PRIMARY KEY REFERENCES models(name),
    spec        TEXT NOT NULL,  -- JSON DeploymentSpec
    update_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS optimization_reports (  -- measured by model servers, latest kept
    model        TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    optimization TEXT    NOT NULL,
    precision    TEXT    NOT NULL,
    device       TEXT    NOT NULL,
    report       TEXT    NOT NULL,  -- JSON modelyard.v1.OptimizationReport
    PRIMARY KEY (model, version, optimization, precision, device),
    FOREIGN KEY (model, version) REFERENCES versions (model, version)
);
CREATE TABLE IF NOT EXISTS held_versions (  -- placed though no alias or pin asks for them
    model   TEXT    NOT NULL REFERENCES models(name),
    version INTEGER NOT NULL,
    until   REAL    NOT NULL,  -- unix s, after which the expiry timer removes the row
    why     TEXT    NOT NULL,  -- "replaced" (retention for rollback) or "promoting"
    PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS audit_log (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    time         REAL    NOT NULL,
    actor        TEXT    NOT NULL,
    method       TEXT    NOT NULL,
    model        TEXT    NOT NULL,
    target       TEXT    NOT NULL,
    request_id   TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,
    error_reason TEXT    NOT NULL,
    message      TEXT    NOT NULL,
    prev_hash    TEXT    NOT NULL DEFAULT '',  -- the hash chain, modelyard/audit_chain.py
    entry_hash   TEXT    NOT NULL DEFAULT ''   -- (both '' on rows from before the chain)
);
CREATE INDEX IF NOT EXISTS audit_log_by_model ON audit_log (model, id);
CREATE TABLE IF NOT EXISTS cluster (  -- one row: this registry's stable identity
    id          TEXT NOT NULL,  -- a random UUID, made when the database is created
    create_time REAL NOT NULL
);
"""

# Created after `_upgrade_columns`, which adds the columns to a database of an older schema.
_ORIGIN_INDEX = """
CREATE UNIQUE INDEX IF NOT EXISTS versions_by_origin
    ON versions (model, origin_cluster, origin_version, origin_sha256) WHERE origin_cluster != ''
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

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.time, retention_s: float = 600.0
    ) -> None:
        self._path = path
        self._clock = clock
        self._retention_s = retention_s
        self._state = _State.UNOPENED
        # One thread owns the connection: sqlite3 objects must stay on the thread that made them,
        # and a single writer is what SQLite supports anyway.
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._cluster_id = ""

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def cluster_id(self) -> str:
        """This registry's stable identity (a UUID made with the database; "" before open)."""
        return self._cluster_id

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

    async def create_model(
        self, name: str, description: str, *, request_id: str = "", require_signature: bool = False
    ) -> ModelRecord:
        """Create a model (`require_signature`: every version must be signed).

        Raises:
            AlreadyExists: the name is taken (unless by an earlier call with this request id,
                whose model is then returned).
        """
        return await self._run(self._create_model, name, description, request_id, require_signature)

    async def get_model(self, name: str) -> ModelRecord:
        """A model with its aliases. Raises ModelNotFound."""
        return await self._run(self._get_model, name)

    async def list_models(self) -> list[ModelRecord]:
        """Every model with its aliases, sorted by name."""
        return await self._run(self._list_models)

    # -- versions --------------------------------------------------------------------------

    async def insert_version(
        self, metadata: UploadMetadata, *, sha256: str, size_bytes: int, created_by: str, signer: str = ""
    ) -> VersionRecord:
        """Record a new version, numbered after the model's latest. Its artifact must be stored.

        A request id already used for this model returns that version instead of a new one.

        Raises:
            ModelNotFound: the model does not exist.
            InvalidArgument: the request id was used for a different artifact.
        """
        assert metadata.format is not None, "validated by the registry"
        return await self._run(self._insert_version, metadata, sha256, size_bytes, created_by, signer)

    async def import_versions(
        self, model: ModelRecord, items: Sequence[ImportItem], *, created_by: str
    ) -> list[tuple[VersionRecord, bool]]:
        """Record imported versions in one transaction: all of them or none. The model is
        created if it does not exist; a version whose origin is already recorded for the model
        is not recorded again (an import is idempotent). Their artifacts must be stored.

        Returns:
            For each item, in order: the version here, and whether this call created it.
        """
        return await self._run(self._import_versions, model, list(items), created_by)

    async def get_version(self, model: str, version: int) -> VersionRecord:
        """One version. Raises ModelNotFound or VersionNotFound."""
        return await self._run(self._get_version, model, version)

    async def record_optimization_reports(
        self, model: str, version: int, reports: tuple[registry_pb2.OptimizationReport, ...]
    ) -> VersionRecord:
        """Store reports with a version, each replacing the one of its profile, precision and
        device. Raises ModelNotFound or VersionNotFound."""
        return await self._run(self._record_reports, model, version, reports)

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
        expected_epoch: int | None = None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
        kind: MoveKind = MoveKind.SET,
    ) -> AliasChange:
        """Point `alias` at `version` in one transaction: compare, move, record, bump the epoch.

        Args:
            expected_version: What the alias must point at now (0: must not exist);
                None moves it whatever it points at.
            expected_epoch: What the model's epoch must be now; None: no check.
            kind: What the move is, for the history.

        Raises:
            ModelNotFound / VersionNotFound: the model or version does not exist.
            FailedPrecondition: the version is archived.
            Conflict: the alias does not point at `expected_version`, or the epoch is not
                `expected_epoch`.
            InvalidArgument: the request id was used for a different move.
        """
        return await self._run(
            self._set_alias,
            model,
            alias,
            version,
            expected_version,
            expected_epoch,
            reason,
            actor,
            request_id,
            kind,
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

    async def rollback_alias(
        self,
        model: str,
        alias: str,
        *,
        expected_version: int | None,
        reason: str = "",
        actor: str = "",
        request_id: str = "",
    ) -> AliasChange:
        """Point `alias` back at what it pointed at before its last move, in one transaction.

        Raises:
            ModelNotFound / AliasNotFound: unknown model or alias.
            Conflict: `expected_version` is set and the alias does not point at it.
            FailedPrecondition: the alias has no earlier target, or it is archived or deleted.
            InvalidArgument: the request id was used for a different move.
        """
        return await self._run(
            self._rollback_alias, model, alias, expected_version, reason, actor, request_id
        )

    async def list_alias_history(
        self,
        model: str,
        alias: str = "",
        *,
        page_size: int = 100,
        before_id: int = 0,
        kind: MoveKind | None = None,
    ) -> list[HistoryEntry]:
        """Moves of a model's aliases (of one alias if named, of one kind if given), newest
        first, with ids below `before_id` when it is set. Raises ModelNotFound."""
        return await self._run(self._list_alias_history, model, alias, page_size, before_id, kind)

    async def routing_state(self, model: str) -> RoutingState:
        """A model's aliases, epoch and deployment. Raises ModelNotFound."""
        return await self._run(self._routing_state, model)

    async def all_routing_states(self) -> dict[str, RoutingState]:
        """Routing state of every model that was ever published (epoch > 0)."""
        return await self._run(self._all_routing_states)

    async def set_deployment(
        self,
        model: str,
        spec: DeploymentSpec,
        *,
        expected_epoch: int = 0,
        fields: frozenset[str] | None = None,
    ) -> DeploymentChange:
        """Change a model's deployment (validated against its aliases and versions) and bump
        its epoch, in one transaction; with `expected_epoch`, only while the model's epoch is
        still that one.

        Args:
            spec: The new deployment, or the new values of `fields`.
            fields: The fields to take from `spec` (the others keep their current values);
                None replaces the whole deployment. Checked by `check_update_mask`.

        Raises:
            ModelNotFound, InvalidArgument, FailedPrecondition: see `check_deployment` (on
                the deployment as it would be after the change).
            Conflict: `expected_epoch` is set and the epoch moved on.
        """
        return await self._run(self._set_deployment, model, spec, expected_epoch, fields)

    async def hold_version(self, model: str, version: int, *, until: float, why: str) -> RoutingState:
        """Place a version until `until` (unix s) whatever the aliases say; bumps the epoch.

        Raises:
            ModelNotFound / VersionNotFound: unknown model or version.
            FailedPrecondition: the version is archived.
        """
        return await self._run(self._hold_version, model, version, until, why)

    async def release_hold(self, model: str, version: int, *, why: str) -> RoutingState | None:
        """Remove a hold placed for `why`; the new state if one was removed, else None."""
        return await self._run(self._release_hold, model, version, why)

    async def expire_holds(self) -> list[RoutingState]:
        """Remove holds whose time is up; the new state of every model that lost one."""
        return await self._run(self._expire_holds)

    async def next_hold_expiry(self) -> float | None:
        """When the earliest hold ends (unix s); None when nothing is held."""
        return await self._run(self._next_hold_expiry)

    async def archive_version(self, model: str, version: int) -> tuple[VersionRecord, RoutingState]:
        """Archive a version (idempotent) and stop placing it.

        Raises:
            ModelNotFound / VersionNotFound: unknown model or version.
            FailedPrecondition: an alias points at it, or it is pinned.
        """
        return await self._run(self._archive_version, model, version)

    async def delete_version(self, model: str, version: int) -> DeleteOutcome:
        """Delete a version's row; says whether its artifact is still used by another version.

        Raises:
            ModelNotFound / VersionNotFound: unknown model or version.
            FailedPrecondition: an alias points at it, or it is pinned.
        """
        return await self._run(self._delete_version, model, version)

    async def add_audit(self, record: AuditRecord) -> int:
        """Append to the audit log; returns the entry's id."""
        return await self._run(self._add_audit, record)

    async def list_audit(
        self, where: AuditFilter, *, page_size: int = 100, before_id: int = 0
    ) -> list[AuditRecord]:
        """Audit entries matching `where`, newest first, with ids below `before_id` if set."""
        return await self._run(self._list_audit, where, page_size, before_id)

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
            _upgrade_columns(conn)
            conn.execute(_ORIGIN_INDEX)
            if conn.execute("SELECT id FROM cluster").fetchone() is None:
                conn.execute(
                    "INSERT INTO cluster (id, create_time) VALUES (?, ?)", (str(uuid.uuid4()), self._clock())
                )
            self._cluster_id = conn.execute("SELECT id FROM cluster").fetchone()["id"]
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

    def _create_model(
        self, name: str, description: str, request_id: str, require_signature: bool
    ) -> ModelRecord:
        with self._transaction() as conn:
            row = conn.execute("SELECT request_id FROM models WHERE name = ?", (name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO models (name, description, create_time, request_id, require_signature) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (name, description, self._clock(), request_id, int(require_signature)),
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
        self, metadata: UploadMetadata, sha256: str, size_bytes: int, created_by: str, signer: str
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
                "description, labels, metrics, created_by, create_time, state, request_id, "
                "input_baselines, signer, model_signature) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    _baselines_to_json(metadata.input_baselines),
                    signer,
                    metadata.model_signature,
                ),
            )
            conn.execute("UPDATE models SET latest_version = ? WHERE name = ?", (version, metadata.model))
            return self._version_in(conn, metadata.model, version)

    def _import_versions(
        self, model: ModelRecord, items: list[ImportItem], created_by: str
    ) -> list[tuple[VersionRecord, bool]]:
        with self._transaction() as conn:
            row = conn.execute("SELECT latest_version FROM models WHERE name = ?", (model.name,)).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO models (name, description, create_time, require_signature) "
                    "VALUES (?, ?, ?, ?)",
                    (model.name, model.description, self._clock(), int(model.require_signature)),
                )
                latest = 0
            else:
                latest = row["latest_version"]
            results: list[tuple[VersionRecord, bool]] = []
            for item in items:
                origin = item.origin
                earlier = conn.execute(
                    "SELECT * FROM versions WHERE model = ? AND origin_cluster = ? AND origin_version = ? "
                    "AND origin_sha256 = ?",
                    (model.name, origin.source_cluster, origin.source_version, origin.source_sha256),
                ).fetchone()
                if earlier is not None:
                    results.append((_version_from(earlier), False))
                    continue
                latest += 1
                meta = item.metadata
                assert meta.format is not None
                conn.execute(
                    "INSERT INTO versions (model, version, format, sha256, size_bytes, signature, "
                    "description, labels, metrics, created_by, create_time, state, request_id, "
                    "input_baselines, signer, model_signature, origin_cluster, origin_version, "
                    "origin_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?, ?, ?, ?)",
                    (
                        model.name,
                        latest,
                        meta.format.value,
                        meta.sha256,
                        item.size_bytes,
                        meta.signature.SerializeToString(deterministic=True),
                        meta.description,
                        json.dumps(meta.labels, sort_keys=True),
                        json.dumps(meta.metrics, sort_keys=True),
                        created_by,
                        self._clock(),
                        VersionState.ACTIVE.value,
                        _baselines_to_json(meta.input_baselines),
                        item.signer,
                        meta.model_signature,
                        origin.source_cluster,
                        origin.source_version,
                        origin.source_sha256,
                    ),
                )
                results.append((self._version_in(conn, model.name, latest), True))
            conn.execute("UPDATE models SET latest_version = ? WHERE name = ?", (latest, model.name))
            return results

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
        reports = tuple(
            json_format.Parse(r["report"], registry_pb2.OptimizationReport())
            for r in conn.execute(
                "SELECT report FROM optimization_reports WHERE model = ? AND version = ? "
                "ORDER BY optimization, precision, device",
                (model, version),
            )
        )
        return dataclasses.replace(_version_from(row), optimization_reports=reports)

    def _record_reports(
        self, model: str, version: int, reports: tuple[registry_pb2.OptimizationReport, ...]
    ) -> VersionRecord:
        with self._transaction() as conn:
            self._version_in(conn, model, version)
            conn.executemany(
                "INSERT OR REPLACE INTO optimization_reports "
                "(model, version, optimization, precision, device, report) VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (model, version, r.optimization, r.precision, r.device, json_format.MessageToJson(r))
                    for r in reports
                ],
            )
            return self._version_in(conn, model, version)

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
        expected_epoch: int | None,
        reason: str,
        actor: str,
        request_id: str,
        kind: MoveKind,
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
            if expected_epoch is not None and expected_epoch != epoch:
                raise _epoch_conflict(model, epoch, expected_epoch)
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
                    state=self._state_in(conn, model),
                )
            return self._move_alias(conn, model, alias, current, version, reason, actor, request_id, kind)

    def _move_alias(
        self,
        conn: sqlite3.Connection,
        model: str,
        alias: str,
        current: int,
        version: int,
        reason: str,
        actor: str,
        request_id: str,
        kind: MoveKind,
    ) -> AliasChange:
        now = self._clock()
        epoch = self._bump(conn, model)
        conn.execute(
            "INSERT INTO aliases (model, alias, version, update_time) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (model, alias) DO UPDATE SET version = excluded.version, "
            "update_time = excluded.update_time",
            (model, alias, version, now),
        )
        conn.execute(
            "INSERT INTO alias_history (model, alias, from_version, to_version, epoch, reason, "
            "actor, request_id, time, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (model, alias, current, version, epoch, reason, actor, request_id, now, kind.value),
        )
        # The new target is aliased now; the old one stays placed for the retention window
        # (unless another alias still points at it), so a rollback finds it loaded and warm.
        conn.execute("DELETE FROM held_versions WHERE model = ? AND version = ?", (model, version))
        aliases = self._alias_map(conn, model)
        if current and current not in aliases.values():
            conn.execute(
                "INSERT INTO held_versions (model, version, until, why) VALUES (?, ?, ?, 'replaced') "
                "ON CONFLICT (model, version) DO UPDATE SET until = max(until, excluded.until), "
                "why = excluded.why",
                (model, current, now + self._retention_s),
            )
        return AliasChange(
            model=model,
            alias=AliasRecord(alias, version, now),
            previous_version=current,
            epoch=epoch,
            aliases=aliases,
            changed=True,
            state=self._state_in(conn, model),
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
            state=self._state_in(conn, earlier["model"]),
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

    def _rollback_alias(
        self,
        model: str,
        alias: str,
        expected_version: int | None,
        reason: str,
        actor: str,
        request_id: str,
    ) -> AliasChange:
        with self._transaction() as conn:
            self._require_model(conn, model)
            if request_id:
                earlier = conn.execute(
                    "SELECT * FROM alias_history WHERE model = ? AND request_id = ?",
                    (model, request_id),
                ).fetchone()
                if earlier is not None:
                    return self._replayed_move(conn, earlier, alias, earlier["to_version"])
            row = conn.execute(
                "SELECT * FROM aliases WHERE model = ? AND alias = ?", (model, alias)
            ).fetchone()
            if row is None:
                raise AliasNotFound(
                    f"model {model!r} has no alias {alias!r}; nothing to roll back",
                    field="alias",
                    metadata={"model": model, "alias": alias},
                )
            current: int = row["version"]
            if expected_version is not None and expected_version != current:
                raise _conflict(model, alias, current, expected_version)
            last = conn.execute(
                "SELECT from_version FROM alias_history WHERE model = ? AND alias = ? "
                "ORDER BY id DESC LIMIT 1",
                (model, alias),
            ).fetchone()
            target = last["from_version"] if last is not None else 0
            if not target:
                raise FailedPrecondition(
                    f"alias {alias!r} of model {model!r} has pointed only at version {current}; "
                    "there is nothing to roll back to (move it with SetAlias)",
                    field="alias",
                )
            found = conn.execute(
                "SELECT state FROM versions WHERE model = ? AND version = ?", (model, target)
            ).fetchone()
            if found is None or found["state"] != VersionState.ACTIVE.value:
                what = "deleted" if found is None else found["state"]
                raise FailedPrecondition(
                    f"alias {alias!r} of model {model!r} pointed at version {target} before, but "
                    f"that version is {what}; move the alias with SetAlias instead",
                    field="alias",
                )
            why = reason or f"rollback from version {current}"
            return self._move_alias(
                conn, model, alias, current, target, why, actor, request_id, MoveKind.ROLLBACK
            )

    def _list_alias_history(
        self, model: str, alias: str, page_size: int, before_id: int, kind: MoveKind | None
    ) -> list[HistoryEntry]:
        with self._read() as conn:
            self._require_model(conn, model)
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
            return [
                HistoryEntry(
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
                for r in conn.execute(query, args)
            ]

    def _routing_state(self, model: str) -> RoutingState:
        with self._read() as conn:
            self._require_model(conn, model)
            return self._state_in(conn, model)

    def _all_routing_states(self) -> dict[str, RoutingState]:
        with self._read() as conn:
            names = [r["name"] for r in conn.execute("SELECT name FROM models WHERE epoch > 0")]
            return {name: self._state_in(conn, name) for name in names}

    def _set_deployment(
        self, model: str, given: DeploymentSpec, expected_epoch: int, fields: frozenset[str] | None
    ) -> DeploymentChange:
        with self._transaction() as conn:
            self._require_model(conn, model)
            if expected_epoch:
                epoch = conn.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()[0]
                if epoch != expected_epoch:
                    raise _epoch_conflict(model, epoch, expected_epoch)
            # Read, overlay and write in the one IMMEDIATE transaction: no other writer can
            # change a field the mask leaves alone in between.
            previous = self._spec_in(conn, model)
            spec = apply_update_mask(previous, given, fields)
            versions = {
                r["version"]: VersionState(r["state"])
                for r in conn.execute("SELECT version, state FROM versions WHERE model = ?", (model,))
            }
            check_deployment(spec, model=model, aliases=self._alias_map(conn, model), versions=versions)
            conn.execute(
                "INSERT INTO deployments (model, spec, update_time) VALUES (?, ?, ?) "
                "ON CONFLICT (model) DO UPDATE SET spec = excluded.spec, "
                "update_time = excluded.update_time",
                (model, spec.to_json(), self._clock()),
            )
            self._bump(conn, model)
            return DeploymentChange(previous=previous, state=self._state_in(conn, model))

    def _hold_version(self, model: str, version: int, until: float, why: str) -> RoutingState:
        with self._transaction() as conn:
            target = self._version_in(conn, model, version)
            if target.state is not VersionState.ACTIVE:
                raise FailedPrecondition(
                    f"version {version} of model {model!r} is {target.state.value}; only active "
                    "versions can be placed",
                    field="version",
                )
            conn.execute(
                "INSERT INTO held_versions (model, version, until, why) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (model, version) DO UPDATE SET until = max(until, excluded.until), "
                "why = excluded.why",
                (model, version, until, why),
            )
            self._bump(conn, model)
            return self._state_in(conn, model)

    def _release_hold(self, model: str, version: int, why: str) -> RoutingState | None:
        with self._transaction() as conn:
            removed = conn.execute(
                "DELETE FROM held_versions WHERE model = ? AND version = ? AND why = ?",
                (model, version, why),
            ).rowcount
            if not removed:
                return None
            self._bump(conn, model)
            return self._state_in(conn, model)

    def _expire_holds(self) -> list[RoutingState]:
        with self._transaction() as conn:
            now = self._clock()
            models = [
                r["model"]
                for r in conn.execute(
                    "SELECT DISTINCT model FROM held_versions WHERE until <= ? ORDER BY model", (now,)
                )
            ]
            conn.execute("DELETE FROM held_versions WHERE until <= ?", (now,))
            for model in models:
                self._bump(conn, model)
            return [self._state_in(conn, model) for model in models]

    def _next_hold_expiry(self) -> float | None:
        with self._read() as conn:
            until: float | None = conn.execute("SELECT min(until) FROM held_versions").fetchone()[0]
            return until

    def _check_unreferenced(self, conn: sqlite3.Connection, model: str, version: int, doing: str) -> None:
        aliased = [
            r["alias"]
            for r in conn.execute(
                "SELECT alias FROM aliases WHERE model = ? AND version = ? ORDER BY alias", (model, version)
            )
        ]
        if aliased:
            raise FailedPrecondition(
                f"cannot {doing} version {version} of model {model!r}: alias(es) "
                f"{', '.join(aliased)} point at it; move them first",
                field="version",
                metadata={"model": model, "version": str(version), "aliases": ",".join(aliased)},
            )
        if version in self._spec_in(conn, model).pinned_versions:
            raise FailedPrecondition(
                f"cannot {doing} version {version} of model {model!r}: the deployment pins it; "
                "unpin it with SetDeployment first",
                field="version",
                metadata={"model": model, "version": str(version)},
            )

    def _archive_version(self, model: str, version: int) -> tuple[VersionRecord, RoutingState]:
        with self._transaction() as conn:
            self._version_in(conn, model, version)
            self._check_unreferenced(conn, model, version, "archive")
            conn.execute(
                "UPDATE versions SET state = ? WHERE model = ? AND version = ?",
                (VersionState.ARCHIVED.value, model, version),
            )
            # Archived versions are not served: stop placing it at once, retention or not.
            conn.execute("DELETE FROM held_versions WHERE model = ? AND version = ?", (model, version))
            self._bump(conn, model)
            return self._version_in(conn, model, version), self._state_in(conn, model)

    def _delete_version(self, model: str, version: int) -> DeleteOutcome:
        with self._transaction() as conn:
            record = self._version_in(conn, model, version)
            self._check_unreferenced(conn, model, version, "delete")
            conn.execute("DELETE FROM held_versions WHERE model = ? AND version = ?", (model, version))
            conn.execute("DELETE FROM versions WHERE model = ? AND version = ?", (model, version))
            still_used = conn.execute(
                "SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", (record.sha256,)
            ).fetchone()
            self._bump(conn, model)
            return DeleteOutcome(
                sha256=record.sha256,
                artifact_unreferenced=still_used is None,
                state=self._state_in(conn, model),
            )

    def _add_audit(self, record: AuditRecord) -> int:
        # The chain hashes whole microseconds; storing exactly those keeps the REAL column,
        # the API's Timestamp and the hash in agreement.
        time_us = audit_chain.micros(record.time)
        with self._transaction() as conn:
            # Inserted first for its id (which the hash covers) and sealed in the same IMMEDIATE
            # transaction: no other writer can append between reading the previous hash and
            # writing this one.
            cursor = conn.execute(
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
            previous = conn.execute(
                "SELECT entry_hash FROM audit_log WHERE id < ? ORDER BY id DESC LIMIT 1", (entry_id,)
            ).fetchone()
            # After rows of an older registry (no hash), the chain starts again from genesis;
            # the verifier accepts unchained rows only before the first chained one.
            prev_hash = previous["entry_hash"] if previous is not None else ""
            sealed = audit_chain.seal(
                _audit_chain_entry(dataclasses.replace(record, id=entry_id), time_us),
                prev_hash or audit_chain.GENESIS_HASH,
            )
            conn.execute(
                "UPDATE audit_log SET prev_hash = ?, entry_hash = ? WHERE id = ?",
                (sealed.prev_hash, sealed.entry_hash, entry_id),
            )
            return entry_id

    def _list_audit(self, where: AuditFilter, page_size: int, before_id: int) -> list[AuditRecord]:
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
        with self._read() as conn:
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
                for r in conn.execute(query, args)
            ]

    def _bump(self, conn: sqlite3.Connection, model: str) -> int:
        conn.execute("UPDATE models SET epoch = epoch + 1 WHERE name = ?", (model,))
        epoch: int = conn.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()[0]
        return epoch

    def _spec_in(self, conn: sqlite3.Connection, model: str) -> DeploymentSpec:
        row = conn.execute("SELECT spec FROM deployments WHERE model = ?", (model,)).fetchone()
        return DeploymentSpec.from_json(row["spec"]) if row is not None else DeploymentSpec()

    def _state_in(self, conn: sqlite3.Connection, model: str) -> RoutingState:
        epoch: int = conn.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()[0]
        aliases = self._alias_map(conn, model)
        spec = self._spec_in(conn, model)
        # Every held row counts until the expiry timer deletes it (and bumps the epoch), so the
        # placed set only ever changes together with the epoch.
        held = [
            r["version"] for r in conn.execute("SELECT version FROM held_versions WHERE model = ?", (model,))
        ]
        return RoutingState(
            model=model,
            aliases=aliases,
            epoch=epoch,
            spec=spec,
            placed_versions=placed_versions(aliases, spec.pinned_versions, held),
        )

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


def _epoch_conflict(model: str, epoch: int, expected: int) -> Conflict:
    return Conflict(
        f"the routing of model {model!r} changed since epoch {expected} (it is at epoch {epoch} "
        "now); read it again (GetDeployment), apply your change to it and retry with the new epoch",
        field="expected_epoch",
        metadata={"model": model, "epoch": str(epoch)},
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
        require_signature=bool(row["require_signature"]),
    )


def _upgrade_columns(conn: sqlite3.Connection) -> None:
    """Add the columns a database of an older schema lacks (CREATE TABLE IF NOT EXISTS keeps
    an existing table as it is). Runs inside the opening transaction."""
    columns = {row["name"] for row in conn.execute("PRAGMA table_info(versions)")}
    if "input_baselines" not in columns:  # schema 2 -> 3
        conn.execute("ALTER TABLE versions ADD COLUMN input_baselines TEXT NOT NULL DEFAULT '[]'")
    if "signer" not in columns:  # schema 3 -> 4
        conn.execute("ALTER TABLE versions ADD COLUMN signer TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE versions ADD COLUMN model_signature BLOB NOT NULL DEFAULT x''")
    model_columns = {row["name"] for row in conn.execute("PRAGMA table_info(models)")}
    if "require_signature" not in model_columns:  # schema 3 -> 4
        conn.execute("ALTER TABLE models ADD COLUMN require_signature INTEGER NOT NULL DEFAULT 0")
    # The audit hash chain, within schema 4: the rows already there stay unchained (the
    # verifier reports them as not covered) and the chain starts at the next one.
    audit_columns = {row["name"] for row in conn.execute("PRAGMA table_info(audit_log)")}
    for column in ("prev_hash", "entry_hash"):
        if column not in audit_columns:
            conn.execute(f"ALTER TABLE audit_log ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
    # Schema 5 -> 6: moves already recorded stay untyped ('': ALIAS_MOVE_KIND_UNSPECIFIED);
    # what they were is not guessed from their reason.
    if "origin_cluster" not in columns:  # schema 6 -> 7
        conn.execute("ALTER TABLE versions ADD COLUMN origin_cluster TEXT NOT NULL DEFAULT ''")
        conn.execute("ALTER TABLE versions ADD COLUMN origin_version INTEGER NOT NULL DEFAULT 0")
        conn.execute("ALTER TABLE versions ADD COLUMN origin_sha256 TEXT NOT NULL DEFAULT ''")
    history_columns = {row["name"] for row in conn.execute("PRAGMA table_info(alias_history)")}
    if "kind" not in history_columns:
        conn.execute("ALTER TABLE alias_history ADD COLUMN kind TEXT NOT NULL DEFAULT ''")


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


def _baselines_to_json(baselines: tuple[registry_pb2.InputBaseline, ...]) -> str:
    return json.dumps(
        [json_format.MessageToDict(b, preserving_proto_field_name=True) for b in baselines],
        sort_keys=True,
    )


def _baselines_from_json(text: str) -> tuple[registry_pb2.InputBaseline, ...]:
    return tuple(json_format.ParseDict(item, registry_pb2.InputBaseline()) for item in json.loads(text))


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
        input_baselines=_baselines_from_json(row["input_baselines"]),
        signer=row["signer"],
        model_signature=bytes(row["model_signature"]),
        origin=(
            VersionOrigin(row["origin_cluster"], row["origin_version"], row["origin_sha256"])
            if row["origin_cluster"]
            else None
        ),
    )
