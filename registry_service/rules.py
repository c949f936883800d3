"""The registry's decisions about its metadata, each made inside one database transaction:
whether an alias may move and what stays placed when it does, which versions a model places,
whether a deployment may change, whether a version may be held, archived or deleted.

Each function takes the `db.Tx` of the transaction it runs in (`await db.run(rules.set_alias,
...)` from `registry.Registry`), reads and writes through the `store_*` modules, and raises
the domain errors of `modelyard.errors`; one that raises leaves nothing written. The pure
deployment rules (what a valid deployment is, how a mask applies) are in `deployments`.
"""

from __future__ import annotations

from modelyard.errors import AliasNotFound, Conflict, FailedPrecondition, InvalidArgument
from registry_service import store_aliases, store_deployments, store_models
from registry_service.db import Tx
from registry_service.deployments import apply_update_mask, check_deployment, placed_versions
from registry_service.records import (
    AliasChange,
    AliasRecord,
    DeleteOutcome,
    DeploymentChange,
    DeploymentSpec,
    HistoryEntry,
    MoveKind,
    RoutingState,
    VersionRecord,
    VersionState,
)

__all__ = [
    "all_routing_states",
    "archive_version",
    "delete_version",
    "expire_holds",
    "hold_version",
    "release_hold",
    "rollback_alias",
    "routing_state",
    "set_alias",
    "set_deployment",
]

# -- routing -------------------------------------------------------------------------------


def routing_state(tx: Tx, model: str) -> RoutingState:
    """A model's aliases, epoch, deployment and the versions it places. Raises ModelNotFound."""
    epoch = store_models.epoch(tx, model)
    aliases = store_aliases.alias_map(tx, model)
    spec = store_deployments.deployment_spec(tx, model)
    # Every held row counts until the expiry timer deletes it (and bumps the epoch), so the
    # placed set only ever changes together with the epoch.
    held = store_deployments.held_versions(tx, model)
    return RoutingState(
        model=model,
        aliases=aliases,
        epoch=epoch,
        spec=spec,
        placed_versions=placed_versions(aliases, spec.pinned_versions, held),
    )


def all_routing_states(tx: Tx) -> dict[str, RoutingState]:
    """Routing state of every model that was ever published (epoch > 0)."""
    return {name: routing_state(tx, name) for name in store_models.published_models(tx)}


# -- aliases -------------------------------------------------------------------------------


def set_alias(
    tx: Tx,
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
    retention_s: float,
) -> AliasChange:
    """Point `alias` at `version`: compare, move, record, bump the epoch.

    Args:
        expected_version: What the alias must point at now (0: must not exist);
            None moves it whatever it points at.
        expected_epoch: What the model's epoch must be now; None: no check.
        kind: What the move is, for the history.
        retention_s: How long the version it pointed at stays placed (for a warm rollback).

    Raises:
        ModelNotFound / VersionNotFound: the model or version does not exist.
        FailedPrecondition: the version is archived.
        Conflict: the alias does not point at `expected_version`, or the epoch is not
            `expected_epoch`.
        InvalidArgument: the request id was used for a different move.
    """
    epoch = store_models.epoch(tx, model)
    if request_id:
        earlier = store_aliases.move_by_request_id(tx, model, request_id)
        if earlier is not None:
            return _replayed_move(tx, earlier, alias, version)
    if expected_epoch is not None and expected_epoch != epoch:
        raise _epoch_conflict(model, epoch, expected_epoch)
    target = store_models.get_version(tx, model, version)
    if target.state is not VersionState.ACTIVE:
        raise FailedPrecondition(
            f"version {version} of model {model!r} is {target.state.value}; only active "
            "versions can be aliased",
            field="version",
        )
    found = store_aliases.find_alias(tx, model, alias)
    current = found.version if found is not None else 0
    if expected_version is not None and expected_version != current:
        raise _conflict(model, alias, current, expected_version)
    if found is not None and current == version:
        # Already there: no move, so no history entry and no new epoch.
        return AliasChange(
            model=model,
            alias=found,
            previous_version=current,
            epoch=epoch,
            aliases=store_aliases.alias_map(tx, model),
            changed=False,
            state=routing_state(tx, model),
        )
    return _move_alias(tx, model, alias, current, version, reason, actor, request_id, kind, retention_s)


def rollback_alias(
    tx: Tx,
    model: str,
    alias: str,
    *,
    expected_version: int | None,
    reason: str = "",
    actor: str = "",
    request_id: str = "",
    retention_s: float,
) -> AliasChange:
    """Point `alias` back at what it pointed at before its last move.

    Raises:
        ModelNotFound / AliasNotFound: unknown model or alias.
        Conflict: `expected_version` is set and the alias does not point at it.
        FailedPrecondition: the alias has no earlier target, or it is archived or deleted.
        InvalidArgument: the request id was used for a different move.
    """
    store_models.require_model(tx, model)
    if request_id:
        earlier = store_aliases.move_by_request_id(tx, model, request_id)
        if earlier is not None:
            return _replayed_move(tx, earlier, alias, earlier.to_version)
    found = store_aliases.find_alias(tx, model, alias)
    if found is None:
        raise AliasNotFound(
            f"model {model!r} has no alias {alias!r}; nothing to roll back",
            field="alias",
            metadata={"model": model, "alias": alias},
        )
    current = found.version
    if expected_version is not None and expected_version != current:
        raise _conflict(model, alias, current, expected_version)
    target = store_aliases.last_move_from(tx, model, alias)
    if not target:
        raise FailedPrecondition(
            f"alias {alias!r} of model {model!r} has pointed only at version {current}; "
            "there is nothing to roll back to (move it with SetAlias)",
            field="alias",
        )
    state = store_models.version_state(tx, model, target)
    if state is not VersionState.ACTIVE:
        what = "deleted" if state is None else state.value
        raise FailedPrecondition(
            f"alias {alias!r} of model {model!r} pointed at version {target} before, but "
            f"that version is {what}; move the alias with SetAlias instead",
            field="alias",
        )
    why = reason or f"rollback from version {current}"
    return _move_alias(
        tx, model, alias, current, target, why, actor, request_id, MoveKind.ROLLBACK, retention_s
    )


def _move_alias(
    tx: Tx,
    model: str,
    alias: str,
    current: int,
    version: int,
    reason: str,
    actor: str,
    request_id: str,
    kind: MoveKind,
    retention_s: float,
) -> AliasChange:
    now = tx.now()
    epoch = store_models.bump_epoch(tx, model)
    store_aliases.write_alias(tx, model, alias, version, now)
    store_aliases.record_move(
        tx,
        model,
        alias,
        current,
        version,
        epoch=epoch,
        reason=reason,
        actor=actor,
        request_id=request_id,
        time=now,
        kind=kind,
    )
    # The new target is aliased now; the old one stays placed for the retention window
    # (unless another alias still points at it), so a rollback finds it loaded and warm.
    store_deployments.drop_holds(tx, model, version)
    aliases = store_aliases.alias_map(tx, model)
    if current and current not in aliases.values():
        store_deployments.hold(tx, model, current, until=now + retention_s, why="replaced")
    return AliasChange(
        model=model,
        alias=AliasRecord(alias, version, now),
        previous_version=current,
        epoch=epoch,
        aliases=aliases,
        changed=True,
        state=routing_state(tx, model),
    )


def _replayed_move(tx: Tx, earlier: HistoryEntry, alias: str, version: int) -> AliasChange:
    if (earlier.alias, earlier.to_version) != (alias, version):
        raise InvalidArgument(
            f"request id {earlier.request_id!r} already moved alias {earlier.alias!r} "
            f"to version {earlier.to_version}; use a new request id for a different move",
            field="request_id",
        )
    # A retry of a move that was applied: answer as the first call was answered.
    return AliasChange(
        model=earlier.model,
        alias=AliasRecord(alias, version, earlier.time),
        previous_version=earlier.from_version,
        epoch=earlier.epoch,
        aliases=store_aliases.alias_map(tx, earlier.model),
        changed=False,
        state=routing_state(tx, earlier.model),
    )


# -- deployments and holds -----------------------------------------------------------------


def set_deployment(
    tx: Tx, model: str, spec: DeploymentSpec, *, expected_epoch: int = 0, fields: frozenset[str] | None = None
) -> DeploymentChange:
    """Change a model's deployment (validated against its aliases and versions) and bump
    its epoch; with `expected_epoch`, only while the model's epoch is still that one.

    Args:
        spec: The new deployment, or the new values of `fields`.
        fields: The fields to take from `spec` (the others keep their current values);
            None replaces the whole deployment. Checked by `check_update_mask`.

    Raises:
        ModelNotFound, InvalidArgument, FailedPrecondition: see `check_deployment` (on
            the deployment as it would be after the change).
        Conflict: `expected_epoch` is set and the epoch moved on.
    """
    store_models.require_model(tx, model)
    if expected_epoch:
        epoch = store_models.epoch(tx, model)
        if epoch != expected_epoch:
            raise _epoch_conflict(model, epoch, expected_epoch)
    # Read, overlay and write in the one IMMEDIATE transaction: no other writer can
    # change a field the mask leaves alone in between.
    previous = store_deployments.deployment_spec(tx, model)
    new = apply_update_mask(previous, spec, fields)
    check_deployment(
        new,
        model=model,
        aliases=store_aliases.alias_map(tx, model),
        versions=store_models.version_states(tx, model),
    )
    store_deployments.write_deployment_spec(tx, model, new)
    store_models.bump_epoch(tx, model)
    return DeploymentChange(previous=previous, state=routing_state(tx, model))


def hold_version(tx: Tx, model: str, version: int, *, until: float, why: str) -> RoutingState:
    """Place a version until `until` (unix s) whatever the aliases say; bumps the epoch.

    Raises:
        ModelNotFound / VersionNotFound: unknown model or version.
        FailedPrecondition: the version is archived.
    """
    target = store_models.get_version(tx, model, version)
    if target.state is not VersionState.ACTIVE:
        raise FailedPrecondition(
            f"version {version} of model {model!r} is {target.state.value}; only active "
            "versions can be placed",
            field="version",
        )
    store_deployments.hold(tx, model, version, until=until, why=why)
    store_models.bump_epoch(tx, model)
    return routing_state(tx, model)


def release_hold(tx: Tx, model: str, version: int, *, why: str) -> RoutingState | None:
    """Remove a hold placed for `why`; the new state if one was removed, else None."""
    if not store_deployments.release_hold(tx, model, version, why=why):
        return None
    store_models.bump_epoch(tx, model)
    return routing_state(tx, model)


def expire_holds(tx: Tx) -> list[RoutingState]:
    """Remove holds whose time is up; the new state of every model that lost one."""
    models = store_deployments.expire_holds(tx, tx.now())
    for model in models:
        store_models.bump_epoch(tx, model)
    return [routing_state(tx, model) for model in models]


# -- archive and delete --------------------------------------------------------------------


def archive_version(tx: Tx, model: str, version: int) -> tuple[VersionRecord, RoutingState]:
    """Archive a version (idempotent) and stop placing it.

    Raises:
        ModelNotFound / VersionNotFound: unknown model or version.
        FailedPrecondition: an alias points at it, or it is pinned.
    """
    store_models.get_version(tx, model, version)
    _check_unreferenced(tx, model, version, "archive")
    store_models.set_version_state(tx, model, version, VersionState.ARCHIVED)
    # Archived versions are not served: stop placing it at once, retention or not.
    store_deployments.drop_holds(tx, model, version)
    store_models.bump_epoch(tx, model)
    return store_models.get_version(tx, model, version), routing_state(tx, model)


def delete_version(tx: Tx, model: str, version: int) -> DeleteOutcome:
    """Delete a version's row; says whether its artifact is still used by another version.

    Raises:
        ModelNotFound / VersionNotFound: unknown model or version.
        FailedPrecondition: an alias points at it, or it is pinned.
    """
    record = store_models.get_version(tx, model, version)
    _check_unreferenced(tx, model, version, "delete")
    store_deployments.drop_holds(tx, model, version)
    store_models.remove_version(tx, model, version)
    still_used = store_models.sha256_in_use(tx, record.sha256)
    store_models.bump_epoch(tx, model)
    return DeleteOutcome(
        sha256=record.sha256, artifact_unreferenced=not still_used, state=routing_state(tx, model)
    )


def _check_unreferenced(tx: Tx, model: str, version: int, doing: str) -> None:
    aliased = store_aliases.aliases_at(tx, model, version)
    if aliased:
        raise FailedPrecondition(
            f"cannot {doing} version {version} of model {model!r}: alias(es) "
            f"{', '.join(aliased)} point at it; move them first",
            field="version",
            metadata={"model": model, "version": str(version), "aliases": ",".join(aliased)},
        )
    if version in store_deployments.deployment_spec(tx, model).pinned_versions:
        raise FailedPrecondition(
            f"cannot {doing} version {version} of model {model!r}: the deployment pins it; "
            "unpin it with SetDeployment first",
            field="version",
            metadata={"model": model, "version": str(version)},
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
