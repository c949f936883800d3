"""`python -m monitor_service`: run the monitor with settings from MODELYARD_MONITOR_* variables."""

from __future__ import annotations

from modelyard.service import run_service
from modelyard.settings import load_settings
from monitor_service.app import MonitorApp
from monitor_service.settings import MonitorSettings

if __name__ == "__main__":
    run_service(lambda: MonitorApp(load_settings(MonitorSettings)))
