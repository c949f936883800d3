"""Gateway settings (env prefix MODELYARD_GATEWAY_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, PositiveFloat
from pydantic_settings import SettingsConfigDict

from modelyard.settings import ServerSettings, ServiceSettings

__all__ = ["GatewaySettings"]


class GatewaySettings(ServiceSettings):
    """Settings of the gateway."""

    model_config = SettingsConfigDict(
        env_prefix="MODELYARD_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    default_port: ClassVar[int] = 50051

    server: ServerSettings = Field(default_factory=lambda: ServerSettings(port=50051))
    """The public gRPC listener (modelyard.v1.InferenceService)."""
    default_alias: str = "production"
    """The alias used when a request selects neither a version nor an alias."""
    default_timeout_s: PositiveFloat = 30.0
    """Deadline given to a model server when the caller sent none."""
    resync_interval_s: PositiveFloat = 2.0
    """How often the routing table is rebuilt from Redis, on top of change events."""
