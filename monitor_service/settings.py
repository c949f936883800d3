"""Monitor settings (env prefix MODELYARD_MONITOR_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, PositiveFloat, PositiveInt
from pydantic_settings import SettingsConfigDict

from modelyard.settings import ServerSettings, ServiceSettings
from monitor_service.canary import CanarySettings

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
    scrape_interval_s: PositiveFloat = 5.0
    """How often every service's /metrics is scraped and the rules and canaries evaluated."""
    window_s: PositiveFloat = 60.0
    """The rolling window of every figure (rates, percentiles, drift, canary comparison)."""
    rules_file: Path | None = None
    """YAML alert rules and drift baselines (see monitor_service.rules); unset: no rules. A bad
    file stops the monitor at start, naming the line."""
    webhook_urls: list[str] = Field(default_factory=list)
    """Where alerts are POSTed in the Alertmanager webhook format (JSON list in the env var)."""
    canary: CanarySettings = Field(default_factory=CanarySettings)
    """Canary analysis and automatic rollback."""
    event_alert_hold_s: PositiveFloat = 300.0
    """How long an event alert (a canary rollback) stays firing before it resolves by itself."""
    drift_learn_items: PositiveInt = 1000
    """Sampled items a model's input baseline is learned from when the rule file gives none."""
    drift_min_items: PositiveInt = 50
    """Sampled items a feature needs in the window before it is scored and tested for drift;
    with fewer, the drift figures have no data (a firing drift alert goes to no data)."""
    shadow_mismatch_threshold: float = Field(default=0.0, ge=0.0, lt=1.0)
    """The shadow mismatch rate over the window above which a `shadow` event says a shadow
    version is mismatching (and, once at or below it again, matching); 0: any mismatch."""
