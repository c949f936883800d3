"""`modelyard audit verify` against a real registry on port 0 (real Redis, real SQLite file):
entries edited, removed, reordered or cut off the tail with sqlite3 behind the registry's back
are named, lowest id first, both through `ListAuditEntries` and reading the file offline."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from modelyard.settings import RedisSettings, ServerSettings, load_settings
from modelyard_cli import registry as cli_registry
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings

pytestmark = pytest.mark.integration

AUDITED_CALLS = 6


@pytest.fixture
async def registry(redis_settings: RedisSettings, tmp_path: Path) -> AsyncIterator[RegistryApp]:
    """A registry with AUDITED_CALLS entries in its audit log (ids 1..6), successes and failures."""
    app = RegistryApp(
        load_settings(
            RegistrySettings,
            server=ServerSettings(port=0, drain_grace_s=1.0),
            redis=redis_settings,
            data_dir=tmp_path / "registry",
        )
    )
    await app.start()
    for args, expected_code in (
        (["models", "create", "alpha"], 0),
        (["models", "create", "beta", "--description", "second"], 0),
        (["alias", "set", "alpha", "production", "1"], 1),  # NOT_FOUND: no version 1
        (["models", "create", "alpha"], 1),  # ALREADY_EXISTS
        (["models", "create", "gamma"], 0),
        (["models", "create", "delta"], 0),
    ):
        code, out = await run(*args, "--registry", app.address)
        assert code == expected_code, out
    yield app
    await app.aclose()


def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """modelyard"""

    cli_registry.add_to(app)
    return app


async def run(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, cli(), list(args), catch_exceptions=False)
    return result.exit_code, result.output


async def verify(registry: RegistryApp, source: str, *extra: str) -> tuple[int, dict[str, Any]]:
    """`audit verify --json` through the registry ("grpc") or on its SQLite file ("db")."""
    where = (
        ["--registry", registry.address]
        if source == "grpc"
        else ["--db", str(registry.settings.resolved_database_path)]
    )
    code, out = await run("audit", "verify", "--json", *where, *extra)
    return code, json.loads(out)


def tamper(registry: RegistryApp, *statements: str) -> None:
    """What an attacker with the file does: plain SQL, bypassing the registry."""
    conn = sqlite3.connect(registry.settings.resolved_database_path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in statements:
            conn.execute(statement)
        conn.execute("COMMIT")
    finally:
        conn.close()


def entry_hash(registry: RegistryApp, entry_id: int) -> str:
    conn = sqlite3.connect(registry.settings.resolved_database_path)
    try:
        row = conn.execute("SELECT entry_hash FROM audit_log WHERE id = ?", (entry_id,)).fetchone()
        return str(row[0])
    finally:
        conn.close()


SOURCES = pytest.mark.parametrize("source", ["grpc", "db"])


@SOURCES
async def test_an_untouched_log_verifies_and_prints_its_head(registry: RegistryApp, source: str) -> None:
    code, report = await verify(registry, source)
    assert code == 0, report
    assert report["intact"] is True and report["problem"] is None
    assert report["entries"] == AUDITED_CALLS and report["not_covered"] == 0
    assert report["head"] == {"id": AUDITED_CALLS, "entry_hash": entry_hash(registry, AUDITED_CALLS)}

    # A head recorded earlier still matches once the log has grown past it.
    code, report = await verify(registry, source, "--expect-head", f"4:{entry_hash(registry, 4)}")
    assert code == 0 and report["intact"] is True, report


async def test_the_readable_report_names_the_head(registry: RegistryApp) -> None:
    code, out = await run("audit", "verify", "--registry", registry.address)
    assert code == 0, out
    assert "intact" in out and f"{AUDITED_CALLS}:{entry_hash(registry, AUDITED_CALLS)}" in out, out


@SOURCES
async def test_an_edited_middle_entry_is_named(registry: RegistryApp, source: str) -> None:
    tamper(registry, "UPDATE audit_log SET actor = 'mallory' WHERE id = 3")
    code, report = await verify(registry, source)
    assert code == 1, report
    assert report["intact"] is False
    assert report["problem"]["entry_id"] == 3 and report["problem"]["kind"] == "edited", report
    assert "entry 3" in report["problem"]["message"]


@SOURCES
async def test_an_edited_time_is_named(registry: RegistryApp, source: str) -> None:
    tamper(registry, "UPDATE audit_log SET time = time + 0.000001 WHERE id = 2")
    code, report = await verify(registry, source)
    assert code == 1 and report["problem"]["entry_id"] == 2 and report["problem"]["kind"] == "edited"


@SOURCES
async def test_a_deleted_middle_entry_is_named(registry: RegistryApp, source: str) -> None:
    tamper(registry, "DELETE FROM audit_log WHERE id = 3")
    code, report = await verify(registry, source)
    assert code == 1, report
    assert report["problem"]["entry_id"] == 3 and report["problem"]["kind"] == "removed", report
    assert "entry 3" in report["problem"]["message"]


@SOURCES
async def test_the_deleted_first_entry_is_named(registry: RegistryApp, source: str) -> None:
    tamper(registry, "DELETE FROM audit_log WHERE id = 1")
    code, report = await verify(registry, source)
    assert code == 1 and report["problem"]["entry_id"] == 1 and report["problem"]["kind"] == "removed"


_COLUMNS = (
    "time, actor, method, model, target, request_id, outcome, error_reason, message, prev_hash, entry_hash"
)


def _swap(first: int, second: int, columns: str = _COLUMNS) -> list[str]:
    """Statements that exchange the contents (everything but the id) of two rows."""
    names = [c.strip() for c in columns.split(",")]
    sets = ", ".join(
        f"{c} = (SELECT {c} FROM audit_log AS o WHERE o.id = "
        f"CASE audit_log.id WHEN {first} THEN {second} ELSE {first} END)"
        for c in names
    )
    return [f"UPDATE audit_log SET {sets} WHERE id IN ({first}, {second})"]


@SOURCES
@pytest.mark.parametrize(
    "columns", [_COLUMNS, _COLUMNS.removesuffix(", prev_hash, entry_hash")], ids=["with-hashes", "content"]
)
async def test_swapped_entries_are_named_as_reordered(
    registry: RegistryApp, source: str, columns: str
) -> None:
    tamper(registry, *_swap(2, 4, columns))
    code, report = await verify(registry, source)
    assert code == 1, report
    assert report["problem"]["entry_id"] == 2 and report["problem"]["kind"] == "reordered", report
    assert "entry 4" in report["problem"]["message"], report


@SOURCES
async def test_a_deleted_last_entry_is_caught_only_against_a_recorded_head(
    registry: RegistryApp, source: str
) -> None:
    head = f"{AUDITED_CALLS}:{entry_hash(registry, AUDITED_CALLS)}"
    tamper(registry, f"DELETE FROM audit_log WHERE id = {AUDITED_CALLS}")

    # The chain alone cannot tell a cut tail from a log that ended there.
    code, report = await verify(registry, source)
    assert code == 0 and report["head"]["id"] == AUDITED_CALLS - 1, report

    code, report = await verify(registry, source, "--expect-head", head)
    assert code == 1, report
    assert report["problem"]["entry_id"] == AUDITED_CALLS and report["problem"]["kind"] == "removed", report
    assert f"entry {AUDITED_CALLS}" in report["problem"]["message"]


async def test_an_entry_appended_after_a_cut_tail_shows_the_gap(registry: RegistryApp) -> None:
    tamper(registry, f"DELETE FROM audit_log WHERE id = {AUDITED_CALLS}")
    await run("models", "create", "epsilon", "--registry", registry.address)  # id 7, after 5
    code, report = await verify(registry, "grpc")
    assert code == 1 and report["problem"]["entry_id"] == AUDITED_CALLS, report
    assert report["problem"]["kind"] == "removed"


@SOURCES
async def test_a_rewritten_log_is_caught_against_a_recorded_head(registry: RegistryApp, source: str) -> None:
    """Whoever can recompute every hash rewrites history unseen, except against a head."""
    head = f"{AUDITED_CALLS}:{entry_hash(registry, AUDITED_CALLS)}"
    tamper(registry, f"UPDATE audit_log SET entry_hash = '{'f' * 64}' WHERE id = {AUDITED_CALLS}")
    code, report = await verify(registry, source, "--expect-head", head)
    assert code == 1 and report["problem"]["entry_id"] == AUDITED_CALLS, report


async def test_the_readable_report_names_the_first_bad_entry(registry: RegistryApp) -> None:
    tamper(registry, "UPDATE audit_log SET outcome = 'OK' WHERE id = 3")
    code, out = await run("audit", "verify", "--registry", registry.address)
    assert code == 1 and "TAMPERED at entry 3 (edited)" in " ".join(out.split()), out


async def test_the_file_of_a_stopped_registry_verifies_offline(registry: RegistryApp) -> None:
    head = f"{AUDITED_CALLS}:{entry_hash(registry, AUDITED_CALLS)}"
    await registry.aclose()
    code, report = await verify(registry, "db", "--expect-head", head)
    assert code == 0 and report["entries"] == AUDITED_CALLS, report


async def test_a_bad_head_option_is_refused(registry: RegistryApp) -> None:
    code, out = await run("audit", "verify", "--registry", registry.address, "--expect-head", "six")
    assert code == 2 and "ID:HASH" in out, out


async def test_a_missing_db_file_is_refused(tmp_path: Path) -> None:
    code, out = await run("audit", "verify", "--db", str(tmp_path / "nope.sqlite3"))
    assert code == 1 and "nope.sqlite3" in out, out
    assert not (tmp_path / "nope.sqlite3").exists()
