"""The registry's settings read their own env prefix and resolve their paths (its servicer's
contract with the protos: tests/unit/test_servicer_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.settings import SettingsError, load_settings
from registry_service.settings import RegistrySettings


def test_settings_defaults_env_and_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    defaults = load_settings(RegistrySettings)
    assert defaults.server.port == 50061
    assert defaults.resolved_database_path == Path("var/registry/registry.sqlite3")
    assert defaults.resolved_artifacts_dir == Path("var/registry/artifacts")

    monkeypatch.setenv("MODELYARD_REGISTRY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODELYARD_REGISTRY_ARTIFACTS_DIR", str(tmp_path / "blobs"))
    monkeypatch.setenv("MODELYARD_REGISTRY_SERVER__PORT", "6000")
    settings = load_settings(RegistrySettings)
    assert settings.server.port == 6000
    assert settings.resolved_database_path == tmp_path / "registry.sqlite3"
    assert settings.resolved_artifacts_dir == tmp_path / "blobs"

    # A nested server variable keeps the registry's well-known port.
    monkeypatch.delenv("MODELYARD_REGISTRY_SERVER__PORT")
    monkeypatch.setenv("MODELYARD_REGISTRY_SERVER__HOST", "0.0.0.0")
    assert load_settings(RegistrySettings).server.port == 50061
    assert load_settings(RegistrySettings, server={"port": 0}).server.port == 0

    monkeypatch.setenv("MODELYARD_REGISTRY_DOWNLOAD_CHUNK_BYTES", str(8 * 1024 * 1024))
    with pytest.raises(SettingsError, match="MODELYARD_REGISTRY_DOWNLOAD_CHUNK_BYTES"):
        load_settings(RegistrySettings)
