"""Deployments and held versions in the registry database: plain functions of a `db.Tx`, run
by `Database.run` / `Database.read`. They read and write; what a valid deployment is and which
versions are placed is decided in `deployments` and `rules`."""

from __future__ import annotations

from registry_service.db import Tx
from registry_service.records import DeploymentSpec

__all__ = [
    "deployment_spec",
    "drop_holds",
    "expire_holds",
    "held_versions",
    "hold",
    "next_hold_expiry",
    "release_hold",
    "write_deployment_spec",
]


def deployment_spec(tx: Tx, model: str) -> DeploymentSpec:
    """A model's deployment (the default one when none was ever set)."""
    row = tx.execute("SELECT spec FROM deployments WHERE model = ?", (model,)).fetchone()
    return DeploymentSpec.from_json(row["spec"]) if row is not None else DeploymentSpec()


def write_deployment_spec(tx: Tx, model: str, spec: DeploymentSpec) -> None:
    """Replace a model's deployment."""
    tx.execute(
        "INSERT INTO deployments (model, spec, update_time) VALUES (?, ?, ?) "
        "ON CONFLICT (model) DO UPDATE SET spec = excluded.spec, update_time = excluded.update_time",
        (model, spec.to_json(), tx.now()),
    )


def held_versions(tx: Tx, model: str) -> list[int]:
    """The versions of a model that are held (placed whatever the aliases say)."""
    return [r["version"] for r in tx.execute("SELECT version FROM held_versions WHERE model = ?", (model,))]


def hold(tx: Tx, model: str, version: int, *, until: float, why: str) -> None:
    """Hold a version until `until` (unix s); an existing hold is kept to the later time and
    takes the new `why`."""
    tx.execute(
        "INSERT INTO held_versions (model, version, until, why) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (model, version) DO UPDATE SET until = max(until, excluded.until), "
        "why = excluded.why",
        (model, version, until, why),
    )


def drop_holds(tx: Tx, model: str, version: int) -> None:
    """Remove the hold on a version, whatever it was for."""
    tx.execute("DELETE FROM held_versions WHERE model = ? AND version = ?", (model, version))


def release_hold(tx: Tx, model: str, version: int, *, why: str) -> bool:
    """Remove the hold on a version placed for `why`; whether there was one."""
    removed = tx.execute(
        "DELETE FROM held_versions WHERE model = ? AND version = ? AND why = ?", (model, version, why)
    ).rowcount
    return bool(removed)


def expire_holds(tx: Tx, now: float) -> list[str]:
    """Remove the holds whose time is up by `now`; the models that lost one, sorted."""
    models = [
        r["model"]
        for r in tx.execute(
            "SELECT DISTINCT model FROM held_versions WHERE until <= ? ORDER BY model", (now,)
        )
    ]
    tx.execute("DELETE FROM held_versions WHERE until <= ?", (now,))
    return models


def next_hold_expiry(tx: Tx) -> float | None:
    """When the earliest hold ends (unix s); None when nothing is held."""
    until: float | None = tx.execute("SELECT min(until) FROM held_versions").fetchone()[0]
    return until
