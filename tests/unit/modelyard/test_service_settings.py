"""Service settings: well-known ports survive partial SERVER__* overrides; errors name the variable."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings
from model_server.settings import ModelServerSettings
from modelyard.settings import ServiceSettings, SettingsError, load_settings
from monitor_service.settings import MonitorSettings
from registry_service.settings import RegistrySettings


@pytest.mark.parametrize(
    "cls,prefix,port",
    [
        (GatewaySettings, "MODELYARD_GATEWAY_", 50051),
        (RegistrySettings, "MODELYARD_REGISTRY_", 50061),
        (MonitorSettings, "MODELYARD_MONITOR_", 50071),
        (ModelServerSettings, "MODELYARD_MODEL_SERVER_", 50081),
    ],
)
def test_default_port_is_kept_when_only_the_host_is_set(
    monkeypatch: pytest.MonkeyPatch, cls: type[ServiceSettings], prefix: str, port: int
) -> None:
    assert load_settings(cls).server.port == port
    monkeypatch.setenv(f"{prefix}SERVER__HOST", "0.0.0.0")
    settings = load_settings(cls)
    assert (settings.server.host, settings.server.port) == ("0.0.0.0", port)
    monkeypatch.setenv(f"{prefix}SERVER__PORT", "0")
    assert load_settings(cls).server.port == 0


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELYARD_GATEWAY_SERVER__PORT", "seventy")
    with pytest.raises(SettingsError, match="MODELYARD_GATEWAY_SERVER__PORT"):
        load_settings(GatewaySettings)
