"""Models and their versions in the registry database: plain functions of a `db.Tx`, run by
`Database.run` / `Database.read`. They read and write; what may change is decided in `rules`."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence

from google.protobuf import json_format

from modelyard.errors import AlreadyExists, InvalidArgument, ModelNotFound, VersionNotFound
from modelyard.v1 import registry_pb2, tensor_pb2
from registry_service.db import Tx
from registry_service.records import (
    AliasRecord,
    ArtifactFormat,
    ImportItem,
    ModelRecord,
    UploadMetadata,
    VersionOrigin,
    VersionRecord,
    VersionState,
)

__all__ = [
    "bump_epoch",
    "create_model",
    "epoch",
    "get_model",
    "get_version",
    "import_versions",
    "insert_version",
    "list_models",
    "list_versions",
    "model_not_found",
    "published_models",
    "record_optimization_reports",
    "remove_version",
    "require_model",
    "set_epoch",
    "set_version_state",
    "sha256_in_use",
    "version_state",
    "version_states",
]

# -- models --------------------------------------------------------------------------------


def create_model(
    tx: Tx, name: str, description: str, *, request_id: str = "", require_signature: bool = False
) -> ModelRecord:
    """Create a model (`require_signature`: every version must be signed).

    Raises:
        AlreadyExists: the name is taken (unless by an earlier call with this request id,
            whose model is then returned).
    """
    row = tx.execute("SELECT request_id FROM models WHERE name = ?", (name,)).fetchone()
    if row is None:
        tx.execute(
            "INSERT INTO models (name, description, create_time, request_id, require_signature) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, description, tx.now(), request_id, int(require_signature)),
        )
    elif not request_id or row["request_id"] != request_id:
        raise AlreadyExists(
            f"model {name!r} already exists; pick another name or upload versions to it",
            field="name",
        )
    return get_model(tx, name)


def get_model(tx: Tx, name: str) -> ModelRecord:
    """A model with its aliases. Raises ModelNotFound."""
    row = tx.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise model_not_found(name)
    aliases = tx.execute("SELECT * FROM aliases WHERE model = ? ORDER BY alias", (name,)).fetchall()
    return _model_from(row, [_alias_from(a) for a in aliases])


def list_models(tx: Tx) -> list[ModelRecord]:
    """Every model with its aliases, sorted by name."""
    aliases: dict[str, list[AliasRecord]] = {}
    for row in tx.execute("SELECT * FROM aliases ORDER BY model, alias"):
        aliases.setdefault(row["model"], []).append(_alias_from(row))
    return [
        _model_from(row, aliases.get(row["name"], []))
        for row in tx.execute("SELECT * FROM models ORDER BY name")
    ]


def require_model(tx: Tx, model: str) -> None:
    """Raises ModelNotFound unless the model exists."""
    if tx.execute("SELECT 1 FROM models WHERE name = ?", (model,)).fetchone() is None:
        raise model_not_found(model)


def epoch(tx: Tx, model: str) -> int:
    """The model's routing epoch. Raises ModelNotFound."""
    row = tx.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()
    if row is None:
        raise model_not_found(model)
    value: int = row["epoch"]
    return value


def bump_epoch(tx: Tx, model: str) -> int:
    """Add one to the model's epoch; returns the new one."""
    tx.execute("UPDATE models SET epoch = epoch + 1 WHERE name = ?", (model,))
    value: int = tx.execute("SELECT epoch FROM models WHERE name = ?", (model,)).fetchone()[0]
    return value


def set_epoch(tx: Tx, model: str, value: int) -> None:
    """Set the model's epoch."""
    tx.execute("UPDATE models SET epoch = ? WHERE name = ?", (value, model))


def published_models(tx: Tx) -> list[str]:
    """The models whose routing ever changed (epoch > 0)."""
    return [r["name"] for r in tx.execute("SELECT name FROM models WHERE epoch > 0")]


def model_not_found(name: str) -> ModelNotFound:
    """The error for a model that does not exist."""
    return ModelNotFound(
        f"model {name!r} does not exist; create it with CreateModel or check the name",
        metadata={"model": name},
    )


# -- versions ------------------------------------------------------------------------------


def insert_version(
    tx: Tx, metadata: UploadMetadata, *, sha256: str, size_bytes: int, created_by: str, signer: str = ""
) -> VersionRecord:
    """Record a new version, numbered after the model's latest. Its artifact must be stored.

    A request id already used for this model returns that version instead of a new one.

    Raises:
        ModelNotFound: the model does not exist.
        InvalidArgument: the request id was used for a different artifact.
    """
    assert metadata.format is not None, "validated by the registry"
    row = tx.execute("SELECT latest_version FROM models WHERE name = ?", (metadata.model,)).fetchone()
    if row is None:
        raise model_not_found(metadata.model)
    if metadata.request_id:
        earlier = tx.execute(
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
    tx.execute(
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
            tx.now(),
            VersionState.ACTIVE.value,
            metadata.request_id,
            _baselines_to_json(metadata.input_baselines),
            signer,
            metadata.model_signature,
        ),
    )
    tx.execute("UPDATE models SET latest_version = ? WHERE name = ?", (version, metadata.model))
    return get_version(tx, metadata.model, version)


def import_versions(
    tx: Tx, model: ModelRecord, items: Sequence[ImportItem], *, created_by: str
) -> list[tuple[VersionRecord, bool]]:
    """Record imported versions (run in one transaction: all of them or none). The model is
    created if it does not exist; a version whose origin is already recorded for the model
    is not recorded again (an import is idempotent). Their artifacts must be stored.

    Returns:
        For each item, in order: the version here, and whether this call created it.
    """
    row = tx.execute("SELECT latest_version FROM models WHERE name = ?", (model.name,)).fetchone()
    if row is None:
        tx.execute(
            "INSERT INTO models (name, description, create_time, require_signature) VALUES (?, ?, ?, ?)",
            (model.name, model.description, tx.now(), int(model.require_signature)),
        )
        latest = 0
    else:
        latest = row["latest_version"]
    results: list[tuple[VersionRecord, bool]] = []
    for item in items:
        origin = item.origin
        earlier = tx.execute(
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
        tx.execute(
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
                tx.now(),
                VersionState.ACTIVE.value,
                _baselines_to_json(meta.input_baselines),
                item.signer,
                meta.model_signature,
                origin.source_cluster,
                origin.source_version,
                origin.source_sha256,
            ),
        )
        results.append((get_version(tx, model.name, latest), True))
    tx.execute("UPDATE models SET latest_version = ? WHERE name = ?", (latest, model.name))
    return results


def get_version(tx: Tx, model: str, version: int) -> VersionRecord:
    """One version, with its optimisation reports. Raises ModelNotFound or VersionNotFound."""
    row = tx.execute("SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)).fetchone()
    if row is None:
        require_model(tx, model)
        raise VersionNotFound(
            f"model {model!r} has no version {version}; list them with ListModelVersions",
            field="version",
            metadata={"model": model, "version": str(version)},
        )
    reports = tuple(
        json_format.Parse(r["report"], registry_pb2.OptimizationReport())
        for r in tx.execute(
            "SELECT report FROM optimization_reports WHERE model = ? AND version = ? "
            "ORDER BY optimization, precision, device",
            (model, version),
        )
    )
    return dataclasses.replace(_version_from(row), optimization_reports=reports)


def record_optimization_reports(
    tx: Tx, model: str, version: int, reports: tuple[registry_pb2.OptimizationReport, ...]
) -> VersionRecord:
    """Store reports with a version, each replacing the one of its profile, precision and
    device. Raises ModelNotFound or VersionNotFound."""
    get_version(tx, model, version)
    tx.executemany(
        "INSERT OR REPLACE INTO optimization_reports "
        "(model, version, optimization, precision, device, report) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (model, version, r.optimization, r.precision, r.device, json_format.MessageToJson(r))
            for r in reports
        ],
    )
    return get_version(tx, model, version)


def list_versions(tx: Tx, model: str) -> list[VersionRecord]:
    """A model's versions, oldest first. Raises ModelNotFound."""
    require_model(tx, model)
    rows = tx.execute("SELECT * FROM versions WHERE model = ? ORDER BY version", (model,)).fetchall()
    return [_version_from(row) for row in rows]


def version_state(tx: Tx, model: str, version: int) -> VersionState | None:
    """A version's state; None when there is no such version."""
    row = tx.execute(
        "SELECT state FROM versions WHERE model = ? AND version = ?", (model, version)
    ).fetchone()
    return VersionState(row["state"]) if row is not None else None


def version_states(tx: Tx, model: str) -> dict[int, VersionState]:
    """The state of each of a model's versions."""
    return {
        r["version"]: VersionState(r["state"])
        for r in tx.execute("SELECT version, state FROM versions WHERE model = ?", (model,))
    }


def set_version_state(tx: Tx, model: str, version: int, state: VersionState) -> None:
    """Set a version's state."""
    tx.execute("UPDATE versions SET state = ? WHERE model = ? AND version = ?", (state.value, model, version))


def remove_version(tx: Tx, model: str, version: int) -> None:
    """Delete a version's row."""
    tx.execute("DELETE FROM versions WHERE model = ? AND version = ?", (model, version))


def sha256_in_use(tx: Tx, sha256: str) -> bool:
    """Whether any version of any model has this artifact."""
    return tx.execute("SELECT 1 FROM versions WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None


# -- rows ----------------------------------------------------------------------------------


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
