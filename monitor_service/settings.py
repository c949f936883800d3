"""Monitor settings (env prefix MODELYARD_MONITOR_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, PositiveFloat
from pydantic_settings import SettingsConfigDict

from modelyard.settings import ServerSettings, ServiceSettings

__all__ = ["MonitorSettings"]


class MonitorSettings(ServiceSettings):
    """Settings of the monitor."""

    model_config = SettingsConfigDict(
        env_prefix="MODELYARD_MONITOR_", env_nested_delimiter="__", extra="ignore"
    )

    default_port: ClassVar[int] = 50071

    server: ServerSettings = Field(default_factory=lambda: ServerSettings(port=50071))
    """The gRPC listener (modelyard.v1.MonitorService)."""
    down_retention_s: PositiveFloat = 300.0
    """How long a service that stopped heartbeating is still reported, as down."""
