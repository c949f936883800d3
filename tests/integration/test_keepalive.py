"""Clients' keepalive pings and servers' ping policy agree: no GOAWAY "too_many_pings" on a
channel idle, then busy, for several ping intervals (modelyard.rpc.keepalive)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelyard.rpc import keepalive

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("keepalive_probe.py")
INTERVAL_MS = 1000
# Idle and busy each for more than 4 ping intervals: with gRPC's default server policy the
# fourth early ping gets the GOAWAY (idle a little longer, for slow timers on a busy machine).
IDLE_S = 7 * INTERVAL_MS / 1000
BUSY_S = 5 * INTERVAL_MS / 1000


def run_probe(*extra: str) -> tuple[dict[str, Any], str]:
    env = {
        **os.environ,
        keepalive.KEEPALIVE_TIME_ENV: str(INTERVAL_MS),
        "GRPC_VERBOSITY": "info",
        "GRPC_TRACE": "http_keepalive",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, str(PROBE), str(IDLE_S), str(BUSY_S), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_idle_then_busy_channel_sees_no_goaway() -> None:
    verdict, log = run_probe()
    assert "too_many_pings" not in log and "ENHANCE_YOUR_CALM" not in log, log[-2000:]
    # The keepalive did run: the server saw the client's pings.
    assert "received ping" in log
    assert verdict["calls"] > 10 and verdict["failures"] == 0, verdict
    # The connection stayed up the whole time (a GOAWAY moves the channel to IDLE).
    assert verdict["states"] == [], verdict


def test_the_probe_catches_a_server_that_refuses_the_pings() -> None:
    verdict, log = run_probe("--strict-server")
    assert "too_many_pings" in log
    assert "IDLE" in verdict["states"] or "TRANSIENT_FAILURE" in verdict["states"], verdict


def test_keepalive_time_comes_from_the_one_setting() -> None:
    assert keepalive.keepalive_time_ms({}) == keepalive.KEEPALIVE_TIME_MS
    env = {keepalive.KEEPALIVE_TIME_ENV: "1000"}
    client = dict(keepalive.client_options(env))
    server = dict(keepalive.server_options(env))
    assert client["grpc.keepalive_time_ms"] == server["grpc.keepalive_time_ms"] == 1000
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= client["grpc.keepalive_time_ms"]
    assert client["grpc.keepalive_permit_without_calls"] == server["grpc.keepalive_permit_without_calls"] == 1
    assert client["grpc.http2.max_pings_without_data"] == 0
    with pytest.raises(ValueError, match=keepalive.KEEPALIVE_TIME_ENV):
        keepalive.keepalive_time_ms({keepalive.KEEPALIVE_TIME_ENV: "soon"})
