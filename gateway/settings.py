"""Gateway settings (env prefix MODELYARD_GATEWAY_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
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
    eject_after_failures: PositiveInt = 3
    """Consecutive failed calls (UNAVAILABLE, INTERNAL, UNKNOWN) after which a replica gets no
    work for `eject_s` (passive health)."""
    eject_s: PositiveFloat = 5.0
    """How long an ejected replica rests before the next call probes it again."""
    shadow_rtol: NonNegativeFloat = 1e-4
    """Relative tolerance when comparing a shadow version's outputs with the served ones."""
    shadow_atol: NonNegativeFloat = 1e-5
    """Absolute tolerance when comparing a shadow version's outputs with the served ones."""
    shadow_max_in_flight: PositiveInt = 64
    """Shadow copies running at once; copies over this are skipped (and counted), never queued."""
    shadow_record_size: PositiveInt = 1000
    """How many shadow comparisons the gateway keeps in memory (the newest)."""
    coalesce_enabled: bool = True
    """Join calls waiting for the same version (same input names, dtypes and non-batch
    dimensions) into one model server call, split back by rows; only once
    `coalesce_max_in_flight` calls per replica are running, so it adds no waiting at low load."""
    coalesce_max_in_flight: PositiveInt = 1
    """Calls per version and replica that run at once before further calls are grouped. One
    measured best (docs/performance.md, "Coalescing"): a model server computes one batch of a
    version at a time anyway, so a second call in flight only waits there, and while one runs
    the next group grows larger. Raise it for versions served with several instances."""
    coalesce_max_items: PositiveInt = 64
    """Most batch items in one joined call."""
