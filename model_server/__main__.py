"""`python -m model_server`: run a model server with settings from MODELYARD_MODEL_SERVER_*."""

from __future__ import annotations

from model_server.app import ModelServerApp
from model_server.settings import ModelServerSettings
from modelyard.service import run_service
from modelyard.settings import load_settings


def main() -> None:
    run_service(lambda: ModelServerApp(load_settings(ModelServerSettings)))


if __name__ == "__main__":
    main()
