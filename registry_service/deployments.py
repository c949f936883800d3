"""Deployment rules, as pure functions: what a valid deployment is, which versions it places,
and the live form (`modelyard.coordination.Deployment`) that Redis carries."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from modelyard.coordination import Deployment
from modelyard.errors import FailedPrecondition, InvalidArgument
from registry_service.records import DeploymentSpec, RoutingState, VersionState

__all__ = ["PRECISIONS", "EXECUTIONS", "check_deployment", "placed_versions", "live_deployment"]

PRECISIONS = frozenset({"", "fp32", "fp16", "bf16"})
"""Accepted `precision` values ("" is the model server's default, fp32)."""

EXECUTIONS = frozenset({"", "auto", "loop", "thread"})
"""Accepted `execution` values ("" is the model server's default); the model server's
`model_server.batching.EXECUTIONS`, which the registry does not import."""

_DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d{1,3}|auto")
_TOTAL_WEIGHT = 100


def check_deployment(
    spec: DeploymentSpec,
    *,
    model: str,
    aliases: Mapping[str, int],
    versions: Mapping[int, VersionState],
) -> None:
    """Refuse a deployment that cannot be served as written.

    Args:
        spec: The deployment asked for.
        model: Its model (for messages).
        aliases: The model's aliases now.
        versions: State of every version of the model.

    Raises:
        InvalidArgument: a field is out of range or names an unknown alias (the field is named).
        FailedPrecondition: a pinned version is archived.
    """
    field = "deployment"
    if spec.replicas < 0:
        raise InvalidArgument("replicas is 0 (every model server) or more", field=f"{field}.replicas")
    if spec.device and _DEVICE_PATTERN.fullmatch(spec.device) is None:
        raise InvalidArgument(
            f"device {spec.device!r} is not one of cpu, cuda, cuda:N, auto", field=f"{field}.device"
        )
    if spec.precision not in PRECISIONS:
        raise InvalidArgument(
            f"precision {spec.precision!r} is not one of fp32, fp16, bf16", field=f"{field}.precision"
        )
    for name in ("max_batch_size", "max_queue_size", "instances"):
        if getattr(spec, name) < 0:
            raise InvalidArgument(f"{name} is 0 (the default) or more", field=f"{field}.{name}")
    delay = spec.max_queue_delay_ms
    if delay is not None and (not math.isfinite(delay) or delay < 0):
        raise InvalidArgument(
            "max_queue_delay_ms is a finite number of milliseconds, 0 or more",
            field=f"{field}.max_queue_delay_ms",
        )
    _check_batching(spec, field)
    if spec.traffic_split:
        at = f"{field}.traffic_split"
        for alias, weight in sorted(spec.traffic_split.items()):
            if alias not in aliases:
                raise InvalidArgument(
                    f"traffic_split names alias {alias!r}, which model {model!r} does not have; "
                    f"its aliases are {sorted(aliases) or 'none'}",
                    field=at,
                )
            if weight < 0:
                raise InvalidArgument(f"the weight of {alias!r} is negative", field=at)
        total = sum(spec.traffic_split.values())
        if total != _TOTAL_WEIGHT:
            raise InvalidArgument(
                f"traffic_split weights sum to {total}; they must sum to {_TOTAL_WEIGHT}", field=at
            )
    if not 0.0 <= spec.shadow_fraction <= 1.0 or not math.isfinite(spec.shadow_fraction):
        raise InvalidArgument("shadow_fraction is between 0 and 1", field=f"{field}.shadow_fraction")
    if spec.shadow_alias:
        if spec.shadow_alias not in aliases:
            raise InvalidArgument(
                f"shadow_alias {spec.shadow_alias!r} is not an alias of model {model!r}",
                field=f"{field}.shadow_alias",
            )
    elif spec.shadow_fraction > 0:
        raise InvalidArgument("shadow_fraction is set but shadow_alias is not", field=f"{field}.shadow_alias")
    for version in spec.pinned_versions:
        state = versions.get(version)
        if state is None:
            raise InvalidArgument(
                f"pinned version {version} of model {model!r} does not exist",
                field=f"{field}.pinned_versions",
            )
        if state is not VersionState.ACTIVE:
            raise FailedPrecondition(
                f"pinned version {version} of model {model!r} is {state.value}; only active "
                "versions can be placed",
                field=f"{field}.pinned_versions",
            )


def _check_batching(spec: DeploymentSpec, field: str) -> None:
    """Preferred batch sizes and execution, as far as the registry can judge them.

    A size above a model server's default `max_batch_size` (when the deployment leaves it
    unset) is only found by that model server, which then fails the version's load with the
    reason (`model_server.placement.serving_config`).
    """
    at = f"{field}.preferred_batch_sizes"
    for size in spec.preferred_batch_sizes:
        if size < 1:
            raise InvalidArgument(f"preferred batch size {size} is not 1 or more", field=at)
        if spec.max_batch_size and size > spec.max_batch_size:
            raise InvalidArgument(
                f"preferred batch size {size} is larger than max_batch_size ({spec.max_batch_size})",
                field=at,
            )
    if spec.execution not in EXECUTIONS:
        raise InvalidArgument(
            f"execution {spec.execution!r} is not one of auto, loop, thread", field=f"{field}.execution"
        )
    if spec.execution == "loop" and spec.instances > 1:
        raise InvalidArgument(
            f"execution 'loop' runs one batch at a time on the event loop; instances must be 1, "
            f"not {spec.instances}",
            field=f"{field}.execution",
        )


def placed_versions(
    aliases: Mapping[str, int], pinned: Iterable[int], held: Iterable[int]
) -> tuple[int, ...]:
    """Every version a model's servers keep loaded: aliased ∪ pinned ∪ held, sorted."""
    return tuple(sorted({*aliases.values(), *pinned, *held}))


def live_deployment(state: RoutingState) -> Deployment:
    """The deployment as Redis carries it to model servers and gateways."""
    spec = state.spec
    return Deployment(
        placed_versions=list(state.placed_versions),
        replicas=spec.replicas,
        device=spec.device or None,
        precision=spec.precision or None,
        max_batch_size=spec.max_batch_size or None,
        max_queue_delay_ms=spec.max_queue_delay_ms,
        max_queue_size=spec.max_queue_size or None,
        instances=spec.instances or None,
        traffic_split=dict(spec.traffic_split),
        shadow_alias=spec.shadow_alias,
        shadow_fraction=spec.shadow_fraction,
        preferred_batch_sizes=list(spec.preferred_batch_sizes),
        execution=spec.execution or None,
    )
