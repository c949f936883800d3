"""The registry's database: one SQLite file, its schema, and the one thread that touches it.

Every statement runs on one dedicated thread with one connection, so calls are serialised
without a lock and the event loop never blocks on disk. A caller hands `Database.run` a plain
function of a `Tx` (the connection and the clock) and it runs, whole, in one `BEGIN IMMEDIATE`
transaction (the write lock is taken up front, so a compare-and-set cannot be raced by another
process opening the same file either); `Database.read` does the same in a deferred transaction,
one consistent snapshot for a multi-statement read. The functions themselves live by resource:
`store_models`, `store_aliases`, `store_deployments`, `store_audit` read and write; the rules
that decide (`rules`) compose them inside one transaction.

The journal is WAL with `synchronous=FULL`: a commit survives a kill -9 *and* a power cut. FULL
matters here: if a committed alias move were lost after Redis had already seen its epoch,
Redis would be ahead of its own source of truth.

A version row is inserted only after its artifact is safely in place (see `registry.py`), so
a crash at any point leaves either no row, or a row whose file exists.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

__all__ = ["Database", "SCHEMA_VERSION", "Tx"]

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
P = ParamSpec("P")


class Tx:
    """One transaction on the database thread: its connection, and the clock that stamps the
    times it writes (read inside the transaction, as each statement runs)."""

    __slots__ = ("conn", "_clock")

    def __init__(self, conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
        self.conn = conn
        self._clock = clock

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Cursor:
        """`sqlite3.Connection.execute` (rows are `sqlite3.Row`)."""
        return self.conn.execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        """`sqlite3.Connection.executemany`."""
        return self.conn.executemany(sql, parameters)

    def now(self) -> float:
        """The registry's clock (unix s)."""
        return self._clock()


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class Database:
    """The registry's SQLite database and the thread that owns its connection.

    Usage::

        db = await Database(settings.resolved_database_path).open()
        model = await db.run(store_models.create_model, "demo", "an MLP")
        versions = await db.read(store_models.list_versions, "demo")
        await db.aclose()

    The functions raise the domain errors of `modelyard.errors` (ModelNotFound, Conflict, ...);
    any exception rolls the whole transaction back.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._path = path
        self._clock = clock
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

    async def open(self) -> Database:
        """Create or migrate the database and connect.

        Raises:
            RuntimeError: opened twice, or the database was written by a newer registry.
        """
        if self._state is not _State.UNOPENED:
            raise RuntimeError("Cannot open the registry database more than once.")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-sqlite")
        self._state = _State.OPENED
        try:
            await self._on_thread(self._connect)
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

    async def run(self, fn: Callable[Concatenate[Tx, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(tx, *args, **kwargs)` on the database thread, in one write transaction
        (`BEGIN IMMEDIATE`): committed when it returns, rolled back when it raises."""
        return await self._on_thread(
            functools.partial(self._in_transaction, "IMMEDIATE", fn, *args, **kwargs)
        )

    async def read(self, fn: Callable[Concatenate[Tx, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(tx, *args, **kwargs)` on the database thread in a deferred transaction: the
        statements it runs see one consistent snapshot."""
        return await self._on_thread(functools.partial(self._in_transaction, "DEFERRED", fn, *args, **kwargs))

    # -- plumbing ------------------------------------------------------------------------------

    async def _on_thread(self, call: Callable[[], T]) -> T:
        if self._state is _State.UNOPENED:
            raise RuntimeError("Cannot use the registry database before open().")
        if self._state is _State.CLOSED or self._executor is None:
            raise RuntimeError("Cannot use the registry database after aclose().")
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _in_transaction(self, mode: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        conn = self._conn
        assert conn is not None, "opened"
        conn.execute(f"BEGIN {mode}")
        try:
            result = fn(Tx(conn, self._clock), *args, **kwargs)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

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
