"""The Grafana dashboard and Prometheus rules only query metrics the cluster exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import gateway.metrics
import model_server.batching
import model_server.stats
import modelyard.telemetry
import modelyard.tls
import monitor_service.metrics

ROOT = Path(__file__).resolve().parents[3]
_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def exported() -> set[str]:
    assert gateway.metrics and model_server.batching and model_server.stats  # registered on import
    assert modelyard.telemetry and modelyard.tls and monitor_service.metrics
    names = {"up"}
    for family in REGISTRY.collect():
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, [""])}
    return names


def queried(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:modelyard|process)_[a-z_]+)\b", expr))
    return names | {"up"} if "up{" in expr else names


def test_every_dashboard_panel_queries_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/modelyard-cluster.json").read_text())
    known = exported()
    assert dashboard["uid"] == "modelyard-cluster" and len(dashboard["panels"]) >= 10
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert queried(target["expr"]) <= known, (panel["title"], queried(target["expr"]) - known)


def test_every_prometheus_alert_queries_exported_metrics() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    known = exported()
    for rule in rules["groups"][0]["rules"]:
        assert queried(rule["expr"]) <= known, (rule["alert"], queried(rule["expr"]) - known)
