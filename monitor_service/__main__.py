"""`python -m monitor_service`: run the monitor with settings from MODELYARD_MONITOR_* variables."""

from __future__ import annotations

import sys

from modelyard.service import run_service
from modelyard.settings import load_settings
from monitor_service.app import MonitorApp
from monitor_service.rules import RuleFileError
from monitor_service.settings import MonitorSettings


def build() -> MonitorApp:
    """The monitor, or exit status 2 with "<file>:<line>: <problem>" for a bad rule file."""
    try:
        return MonitorApp(load_settings(MonitorSettings))
    except RuleFileError as exc:
        print(f"monitor: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run_service(build)
