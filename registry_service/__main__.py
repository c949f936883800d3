"""`python -m registry_service`: run the registry until SIGTERM or SIGINT, then drain."""

from __future__ import annotations

from modelyard.service import run_service
from modelyard.settings import load_settings
from registry_service.app import RegistryApp
from registry_service.settings import RegistrySettings


def main() -> None:
    """Start the registry with settings from the environment (`MODELYARD_REGISTRY_*`)."""
    run_service(lambda: RegistryApp(load_settings(RegistrySettings)))


if __name__ == "__main__":
    main()
