"""The compose smoke test's observability checks, from the host through the published ports.

    python deploy/docker/smoke_observability.py PROMETHEUS_URL [GRAFANA_URL]

Prometheus: every scrape target up and every rule of deploy/prometheus/alerts.yml loaded; the
main panels of the Modelyard dashboard return data (their queries, run on Prometheus, after
the smoke test's Predict calls). Grafana, when given: healthy, its Prometheus data source
answers, and the dashboard is provisioned. Exits non-zero with the first failure.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/modelyard-cluster.json"
RULES = ROOT / "deploy/prometheus/alerts.yml"
# Panels that must show data once the demo has been served.
MAIN_PANELS = ("Requests/s by version (model servers)", "Gateway requests/s by alias", "Process CPU (cores)")
# How long Prometheus may take to see every target, and the panels their data.
WAIT_S = float(os.environ.get("MODELYARD_SMOKE_WAIT_S", "90"))


def get(url: str, *, auth: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def eventually(what: str, check: Any) -> Any:
    """`check()`'s result once it is truthy; fails after WAIT_S with the last answer."""
    deadline, last = time.monotonic() + WAIT_S, None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(2)
    sys.exit(f"observability: {what}: not after {WAIT_S:.0f} s (last: {last!r})")


def query(prometheus: str, expr: str) -> list[Any]:
    expr = expr.replace('=~"$model"', '=~".*"').replace("$__rate_interval", "1m")
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    result: list[Any] = get(url)["data"]["result"]
    return result


def check_prometheus(prometheus: str) -> None:
    def targets_up() -> bool:
        targets = get(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        down = [f"{t['labels']['instance']} {t['health']}" for t in targets if t["health"] != "up"]
        if down:
            print(f"observability: waiting for targets: {down}")
        return bool(targets) and not down

    eventually("every Prometheus target up", targets_up)
    targets = get(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
    print(f"observability: Prometheus scrapes {len(targets)} targets, all up")
    wanted = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    groups = get(f"{prometheus}/api/v1/rules")["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    if wanted - loaded:
        sys.exit(f"observability: alert rules not loaded by Prometheus: {sorted(wanted - loaded)}")
    print(f"observability: Prometheus has the {len(wanted)} alert rules of alerts.yml loaded")
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    for title in MAIN_PANELS:
        exprs = [t["expr"] for t in panels[title]["targets"]]
        eventually(
            f"dashboard panel {title!r} has data",
            lambda exprs=exprs: any(query(prometheus, e) for e in exprs),  # bound per panel
        )
    print(f"observability: the dashboard's main panels return data: {', '.join(MAIN_PANELS)}")


def check_grafana(grafana: str) -> None:
    auth = "admin:admin"  # the image's first-start admin; the smoke cluster is thrown away
    eventually("Grafana healthy", lambda: get(f"{grafana}/api/health").get("database") == "ok")
    uid = json.loads(DASHBOARD.read_text())["uid"]
    board = eventually("dashboard provisioned", lambda: get(f"{grafana}/api/dashboards/uid/{uid}", auth=auth))
    print(f"observability: Grafana healthy, dashboard {board['dashboard']['title']!r} provisioned")
    health = get(f"{grafana}/api/datasources/uid/prometheus/health", auth=auth)
    if health.get("status") != "OK":
        sys.exit(f"observability: Grafana's Prometheus data source: {health}")
    print("observability: Grafana reaches Prometheus")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    check_prometheus(sys.argv[1])
    if len(sys.argv) == 3:
        check_grafana(sys.argv[2])
