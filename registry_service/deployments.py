"""Deployment rules, as pure functions: what a valid deployment is, which versions it places,
how an update mask applies to one (AIP-134), what changed between two (for the audit log),
and the live form (`modelyard.coordination.Deployment`) that Redis carries."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping

from modelyard.coordination import Deployment
from modelyard.errors import FailedPrecondition, InvalidArgument
from registry_service.records import DeploymentSpec, RoutingState, VersionState

__all__ = [
    "PRECISIONS",
    "EXECUTIONS",
    "OPTIMIZATIONS",
    "SPEC_FIELDS",
    "OUTPUT_ONLY_FIELDS",
    "check_deployment",
    "check_update_mask",
    "apply_update_mask",
    "deployment_diff",
    "placed_versions",
    "live_deployment",
]

PRECISIONS = frozenset({"", "fp32", "fp16", "bf16"})
"""Accepted `precision` values ("" is the model server's default, fp32)."""

OPTIMIZATIONS = frozenset({"", "none", "int8_dynamic", "freeze", "compile"})
"""Accepted `optimization` values ("" is "none"); `model_server.optimization.PROFILES`, which
the registry does not import."""

EXECUTIONS = frozenset({"", "auto", "loop", "thread"})
"""Accepted `execution` values ("" is the model server's default); the model server's
`model_server.batching.EXECUTIONS`, which the registry does not import."""

SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DeploymentSpec))
"""The settable fields of a deployment, in `modelyard.v1.Deployment` order: the paths an
update mask may name (the names are the same in the message and in `DeploymentSpec`)."""

OUTPUT_ONLY_FIELDS = frozenset({"placed_versions", "epoch"})
"""Fields of `modelyard.v1.Deployment` that the registry computes; a mask naming one is refused."""

MAX_DIFF_CHARS = 1000
"""The longest `deployment_diff` text; a longer one is cut, ending with "…"."""

_MAX_VALUE_CHARS = 160
_DEVICE_PATTERN = re.compile(r"cpu|cuda|cuda:\d{1,3}|auto")
_TOTAL_WEIGHT = 100


def check_update_mask(paths: Collection[str]) -> frozenset[str] | None:
    """The fields an update mask names, or None when it means the whole deployment ("*", or
    no path at all: the replace-all meaning SetDeployment had before the mask).

    Raises:
        InvalidArgument: a path is unknown, output-only, a sub-path (`traffic_split.canary`),
            or "*" next to other paths; the message lists the paths allowed.
    """
    if not paths or list(paths) == ["*"]:
        return None
    allowed = ", ".join(SPEC_FIELDS)
    for path in paths:
        shown = repr(path[:80])
        if path == "*":
            raise InvalidArgument(
                "update_mask: '*' (the whole deployment) stands alone, not next to other paths",
                field="update_mask",
            )
        if path in OUTPUT_ONLY_FIELDS:
            raise InvalidArgument(
                f"update_mask names {shown}, which is output only (the registry computes it); "
                f"the paths allowed are {allowed}, or '*'",
                field="update_mask",
            )
        if path not in SPEC_FIELDS:
            what = "a sub-path, and masks name whole fields" if "." in path else "not a Deployment field"
            raise InvalidArgument(
                f"update_mask names {shown}, {what}; the paths allowed are {allowed}, or '*'",
                field="update_mask",
            )
    return frozenset(paths)


def apply_update_mask(
    current: DeploymentSpec, given: DeploymentSpec, fields: frozenset[str] | None
) -> DeploymentSpec:
    """`current` with the fields named in `fields` taken from `given` (all of them: None)."""
    if fields is None:
        return given
    return dataclasses.replace(current, **{name: getattr(given, name) for name in fields})


def deployment_diff(old: DeploymentSpec, new: DeploymentSpec, *, max_chars: int = MAX_DIFF_CHARS) -> str:
    """What changed from `old` to `new`, field by field in message order, for the audit log
    and the registry's log: `traffic_split {} -> {canary: 10, production: 90}; shadow_alias
    "" -> "canary"`, or "no change". At most `max_chars` characters."""
    parts = [
        f"{name} {_value_text(getattr(old, name))} -> {_value_text(getattr(new, name))}"
        for name in SPEC_FIELDS
        if getattr(old, name) != getattr(new, name)
    ]
    text = "; ".join(parts) or "no change"
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def _value_text(value: object) -> str:
    if value is None:
        text = "unset"
    elif isinstance(value, str):
        text = json.dumps(value)
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {_value_text(v)}" for k, v in sorted(value.items())) + "}"
    elif isinstance(value, (tuple, list)):
        text = "[" + ", ".join(_value_text(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"


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
    if spec.optimization not in OPTIMIZATIONS:
        raise InvalidArgument(
            f"optimization {spec.optimization!r} is not one of none, int8_dynamic, freeze, compile",
            field=f"{field}.optimization",
        )
    if spec.max_abs_error is not None and (not math.isfinite(spec.max_abs_error) or spec.max_abs_error < 0):
        raise InvalidArgument("max_abs_error is a finite number, 0 or more", field=f"{field}.max_abs_error")
    top1 = spec.min_top1_agreement
    if top1 is not None and not 0.0 <= top1 <= 1.0:
        raise InvalidArgument("min_top1_agreement is between 0 and 1", field=f"{field}.min_top1_agreement")
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
        optimization=spec.optimization or None,
        max_abs_error=spec.max_abs_error,
        min_top1_agreement=spec.min_top1_agreement,
    )
