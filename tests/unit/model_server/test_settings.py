"""Model server settings: env prefix, default port, validation, torch threads."""

from __future__ import annotations

import pytest

from model_server.settings import ModelServerSettings, resolve_torch_threads
from modelyard.settings import SettingsError, load_settings


def test_defaults() -> None:
    settings = load_settings(ModelServerSettings)
    assert settings.server.port == 50081
    assert (settings.max_batch_size, settings.max_queue_delay_ms, settings.instances) == (64, 2.0, 1)
    assert settings.registry_address == "127.0.0.1:50061"


def test_nested_server_variables_keep_the_default_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_MODEL_SERVER_SERVER__HOST", "0.0.0.0")
    monkeypatch.setenv("MODELYARD_MODEL_SERVER_MAX_BATCH_SIZE", "32")
    settings = load_settings(ModelServerSettings)
    assert (settings.server.host, settings.server.port, settings.max_batch_size) == ("0.0.0.0", 50081, 32)

    monkeypatch.setenv("MODELYARD_MODEL_SERVER_SERVER__PORT", "0")
    assert load_settings(ModelServerSettings).server.port == 0
    assert load_settings(ModelServerSettings, server={"port": 7}).server.port == 7


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_MODEL_SERVER_MAX_BATCH_SIZE", "0")
    with pytest.raises(SettingsError, match="MODELYARD_MODEL_SERVER_MAX_BATCH_SIZE"):
        load_settings(ModelServerSettings)


def test_torch_threads_leave_a_core_for_the_event_loop() -> None:
    assert resolve_torch_threads(None, 1, cores=2) == 1
    assert resolve_torch_threads(None, 1, cores=16) == 15
    assert resolve_torch_threads(None, 4, cores=16) == 3
    assert resolve_torch_threads(None, 8, cores=2) == 1
    assert resolve_torch_threads(6, 4, cores=2) == 6
