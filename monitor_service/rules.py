"""Alert rules and drift baselines from a YAML file, checked at start with the line at fault.

The file::

    rules:
      - name: HighErrorRate          # the alertname
        metric: error_rate           # see METRICS
        op: ">"                      # >, >=, <, <= (default >)
        threshold: 0.05
        for: 30s                     # how long the condition must hold before firing
        keep_firing_for: 1m          # how long it must be seen false, on data, to resolve
        model: "*"                   # a model name, or "*" (default) for every model
        alias: production            # only the version this alias points at (optional)
        min_requests: 20             # rate rules: fewer requests in the window never match
        severity: critical
        labels: {team: ml}
        annotations: {summary: "error rate above 5 %"}
    baselines:                       # input drift reference per model and input
      mlp:
        input: {mean: [0.0, 0.1], std: [1.0, 1.0]}

Durations are numbers of seconds or strings such as "500ms", "30s", "5m", "1h".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelyard.errors import InvalidArgument

__all__ = ["METRICS", "AlertRule", "Baseline", "RuleFile", "RuleFileError", "load_rule_file", "parse_rules"]

METRICS = {
    "error_rate": "fraction of failed requests in the window (0 to 1)",
    "latency_p50": "median latency, seconds",
    "latency_p95": "95th percentile latency, seconds",
    "latency_p99": "99th percentile latency, seconds",
    "requests_per_second": "completed requests per second",
    "queue_depth": "items waiting in the batch queues",
    "no_ready_replica": "1 when an aliased version has no ready replica, else 0",
    "input_drift": "largest standardised mean shift of an input feature vs the baseline",
    "input_psi": "largest population stability index of an input feature vs the registry baseline",
    "input_drift_p": "smallest p-value of the per-feature drift tests, corrected for their number "
    "(test it with op '<', e.g. 0.001)",
}
"""Every metric a rule can test, with its unit."""

_OPS = (">", ">=", "<", "<=")
_FIELDS = {
    "name",
    "metric",
    "op",
    "threshold",
    "for",
    "keep_firing_for",
    "model",
    "alias",
    "min_requests",
    "severity",
    "labels",
    "annotations",
}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class RuleFileError(InvalidArgument):
    """A rule file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class AlertRule:
    """One alert rule."""

    name: str
    metric: str
    threshold: float
    op: str = ">"
    for_s: float = 0.0
    keep_firing_for_s: float = 0.0
    """A firing alert resolves once its condition has been false on data this long (0: at
    the first evaluation that finds it false); evaluations without data restart the count."""
    model: str = "*"
    alias: str = ""
    min_requests: int = 1
    severity: str = "warning"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    line: int = 0

    def matches(self, value: float) -> bool:
        """Whether a value meets the condition (NaN never does)."""
        if value != value:  # NaN
            return False
        match self.op:
            case ">":
                return value > self.threshold
            case ">=":
                return value >= self.threshold
            case "<":
                return value < self.threshold
            case _:
                return value <= self.threshold


@dataclass(frozen=True)
class Baseline:
    """Reference mean and standard deviation per feature of one model input."""

    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class RuleFile:
    """A parsed rule file."""

    rules: list[AlertRule] = field(default_factory=list)
    baselines: dict[str, dict[str, Baseline]] = field(default_factory=dict)
    """model -> input -> baseline."""


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like "500ms", "30s", "5m"."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 500ms, 5m)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {value!r}")
    return seconds


def load_rule_file(path: str | Path) -> RuleFile:
    """Read and check a rule file.

    Raises:
        RuleFileError: unreadable, not YAML, or a rule that does not make sense; the message
            is "<path>:<line>: <what is wrong>".
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise RuleFileError(f"{path}: cannot read the rule file: {exc}") from exc
    return parse_rules(text, str(path))


def parse_rules(text: str, source: str = "<rules>") -> RuleFile:
    """Parse rule-file text; see `load_rule_file`."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise RuleFileError(f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if root is None:
        return RuleFile()

    def fail(node: yaml.Node, message: str) -> RuleFileError:
        return RuleFileError(f"{source}:{node.start_mark.line + 1}: {message}")

    if not isinstance(root, yaml.MappingNode):
        raise fail(root, "the rule file must be a mapping with 'rules' and/or 'baselines'")
    rules: list[AlertRule] = []
    baselines: dict[str, dict[str, Baseline]] = {}
    names: set[tuple[str, str, str]] = set()
    for key_node, value_node in root.value:
        if key_node.value == "rules":
            if not isinstance(value_node, yaml.SequenceNode):
                raise fail(value_node, "'rules' must be a list")
            for rule_node in value_node.value:
                rule = _parse_rule(rule_node, fail)
                identity = (rule.name, rule.model, rule.alias)
                if identity in names:
                    raise fail(rule_node, f"rule {rule.name!r} is defined twice for the same model")
                names.add(identity)
                rules.append(rule)
        elif key_node.value == "baselines":
            baselines = _parse_baselines(value_node, fail)
        else:
            raise fail(key_node, f"unknown section {key_node.value!r} (expected 'rules' or 'baselines')")
    return RuleFile(rules, baselines)


def _python(node: yaml.Node) -> Any:
    constructor = yaml.constructor.SafeConstructor()
    return constructor.construct_object(node, deep=True)


def _parse_rule(node: yaml.Node, fail: Any) -> AlertRule:
    if not isinstance(node, yaml.MappingNode):
        raise fail(node, "a rule must be a mapping")
    fields: dict[str, tuple[yaml.Node, Any]] = {}
    for key_node, value_node in node.value:
        if key_node.value not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise fail(key_node, f"unknown rule field {key_node.value!r}; known: {known}")
        fields[key_node.value] = (value_node, _python(value_node))
    # no_ready_replica is a condition, not a measure: it needs no threshold.
    needs_threshold = "metric" not in fields or fields["metric"][1] != "no_ready_replica"
    for required in ("name", "metric", "threshold") if needs_threshold else ("name", "metric"):
        if required not in fields:
            raise fail(node, f"the rule has no {required!r}")
    values: dict[str, Any] = {"line": node.start_mark.line + 1}
    for name, (value_node, value) in fields.items():
        try:
            values.update(_check_field(name, value))
        except (TypeError, ValueError) as exc:
            raise fail(value_node, f"{name}: {exc}") from exc
    if values["metric"] == "no_ready_replica":
        values.setdefault("threshold", 0.5)
        values.setdefault("op", ">")
    return AlertRule(**values)


def _check_field(name: str, value: Any) -> dict[str, Any]:
    match name:
        case "name":
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
                raise ValueError(f"{value!r} is not a valid alert name (letters, digits, _)")
            return {"name": value}
        case "metric":
            if value not in METRICS:
                raise ValueError(f"unknown metric {value!r}; known: {', '.join(METRICS)}")
            return {"metric": value}
        case "op":
            if value not in _OPS:
                raise ValueError(f"unknown operator {value!r}; use one of {' '.join(_OPS)}")
            return {"op": value}
        case "threshold":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"must be a number, not {value!r}")
            return {"threshold": float(value)}
        case "for":
            return {"for_s": parse_duration(value)}
        case "keep_firing_for":
            return {"keep_firing_for_s": parse_duration(value)}
        case "model" | "alias" | "severity":
            if not isinstance(value, str) or not value:
                raise ValueError(f"must be a non-empty string, not {value!r}")
            return {name: value}
        case "min_requests":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"must be a positive integer, not {value!r}")
            return {"min_requests": value}
        case _:  # labels, annotations
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ValueError("must be a mapping of names to strings")
            return {name: {k: str(v) for k, v in value.items()}}


def _parse_baselines(node: yaml.Node, fail: Any) -> dict[str, dict[str, Baseline]]:
    if not isinstance(node, yaml.MappingNode):
        raise fail(node, "'baselines' must map model -> input -> {mean, std}")
    out: dict[str, dict[str, Baseline]] = {}
    for model_key, inputs_node in node.value:
        if not isinstance(inputs_node, yaml.MappingNode):
            raise fail(inputs_node, f"baselines of {model_key.value!r} must map input -> {{mean, std}}")
        for input_key, spec_node in inputs_node.value:
            spec = _python(spec_node)
            mean, std = (spec.get("mean"), spec.get("std")) if isinstance(spec, dict) else (None, None)
            if (
                not isinstance(mean, list)
                or not isinstance(std, list)
                or len(mean) != len(std)
                or not all(isinstance(x, int | float) for x in mean + std)
                or any(s <= 0 for s in std)
            ):
                raise fail(
                    spec_node,
                    "a baseline needs 'mean' and 'std' lists of numbers of the same length, every std > 0",
                )
            out.setdefault(model_key.value, {})[input_key.value] = Baseline(
                [float(x) for x in mean], [float(x) for x in std]
            )
    return out
