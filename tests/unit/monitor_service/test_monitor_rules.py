"""Rule files: what parses, and bad files refused with the line at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.settings import RedisSettings, ServerSettings, load_settings
from monitor_service.app import MonitorApp
from monitor_service.rules import RuleFileError, load_rule_file, parse_duration, parse_rules
from monitor_service.settings import MonitorSettings

GOOD = """\
rules:
  - name: HighErrorRate
    metric: error_rate
    threshold: 0.05
    for: 30s
    min_requests: 20
    labels: {team: ml}
  - name: SlowP99
    metric: latency_p99
    op: ">="
    threshold: 0.25
    model: mlp
    alias: production
    for: 1m
  - name: NoReplica
    metric: no_ready_replica
baselines:
  mlp:
    input: {mean: [0, 1.5], std: [1, 2]}
"""


def test_a_good_file_parses_with_defaults() -> None:
    parsed = parse_rules(GOOD)
    first, second, third = parsed.rules
    assert (first.name, first.metric, first.threshold, first.for_s, first.op, first.model) == (
        "HighErrorRate",
        "error_rate",
        0.05,
        30.0,
        ">",
        "*",
    )
    assert first.min_requests == 20 and first.labels == {"team": "ml"} and first.line == 2
    assert (second.op, second.model, second.alias, second.for_s, second.line) == (
        ">=",
        "mlp",
        "production",
        60.0,
        8,
    )
    assert third.metric == "no_ready_replica" and third.matches(1.0) and not third.matches(0.0)
    assert parsed.baselines["mlp"]["input"].mean == [0.0, 1.5]
    assert parsed.baselines["mlp"]["input"].std == [1.0, 2.0]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("rules:\n  - name: A\n    metric: error_rat\n    threshold: 1\n", 3, "unknown metric 'error_rat'"),
        ("rules:\n  - name: A\n    metric: error_rate\n    threshold: high\n", 4, "must be a number"),
        (
            "rules:\n  - name: A\n    metric: error_rate\n    threshold: 1\n    for: soon\n",
            5,
            "not a duration",
        ),
        (
            "rules:\n  - name: A\n    metric: error_rate\n    treshold: 1\n",
            4,
            "unknown rule field 'treshold'",
        ),
        ("rules:\n  - name: A\n    metric: error_rate\n", 2, "no 'threshold'"),
        (
            "rules:\n  - name: A\n    metric: error_rate\n    threshold: 1\n    op: '=>'\n",
            5,
            "unknown operator",
        ),
        ("rules:\n  - name: A\n    metric: x\n  bad indent: [\n", 4, "not valid YAML"),
        ("alerts: []\n", 1, "unknown section 'alerts'"),
        (
            "rules:\n  - {name: A, metric: error_rate, threshold: 1}\n"
            "  - {name: A, metric: error_rate, threshold: 2}\n",
            3,
            "defined twice",
        ),
        ("baselines:\n  m:\n    input: {mean: [0, 1], std: [1]}\n", 3, "same length"),
    ],
)
def test_a_bad_file_is_refused_with_the_line_at_fault(text: str, line: int, words: str) -> None:
    with pytest.raises(RuleFileError) as caught:
        parse_rules(text, "rules.yaml")
    assert str(caught.value).startswith(f"rules.yaml:{line}: "), str(caught.value)
    assert words in str(caught.value)


def test_durations() -> None:
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120.0
    assert parse_duration(3) == 3.0
    with pytest.raises(ValueError):
        parse_duration("-1s")


def test_the_monitor_refuses_to_start_on_a_bad_rule_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - name: A\n    metric: nope\n    threshold: 1\n")
    settings = load_settings(
        MonitorSettings,
        server=ServerSettings(port=0, metrics_port=0),
        redis=RedisSettings(url="redis://127.0.0.1:1"),
        rules_file=rules,
    )
    with pytest.raises(RuleFileError, match=r"rules.yaml:3: metric: unknown metric 'nope'"):
        MonitorApp(settings)
    with pytest.raises(RuleFileError, match="cannot read"):
        load_rule_file(tmp_path / "missing.yaml")
