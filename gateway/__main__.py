"""`python -m gateway`: run a gateway with settings from MODELYARD_GATEWAY_* variables."""

from __future__ import annotations

from gateway.app import GatewayApp
from gateway.settings import GatewaySettings
from modelyard.service import run_service
from modelyard.settings import load_settings

if __name__ == "__main__":
    run_service(lambda: GatewayApp(load_settings(GatewaySettings)))
