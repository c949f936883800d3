"""Settings of the registry service (env prefix `MODELYARD_REGISTRY_`).

For example `MODELYARD_REGISTRY_DATA_DIR=/var/lib/modelyard/registry` or
`MODELYARD_REGISTRY_SERVER__PORT=50061`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, NonNegativeFloat, PositiveFloat, SecretStr
from pydantic_settings import SettingsConfigDict

from modelyard.settings import ServerSettings, ServiceSettings, SigningSettings

__all__ = ["RegistrySettings", "DEFAULT_PORT"]

DEFAULT_PORT = 50061

# gRPC clients refuse messages over 4 MiB unless told otherwise; a download message carries a
# chunk plus a few header bytes, so a chunk stays a little under that.
_MAX_DOWNLOAD_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024


class RegistrySettings(ServiceSettings):
    """Everything the registry reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="MODELYARD_REGISTRY_", env_nested_delimiter="__", extra="ignore"
    )
    default_port: ClassVar[int] = DEFAULT_PORT

    server: ServerSettings = Field(default_factory=lambda: ServerSettings(port=DEFAULT_PORT))
    """The gRPC listener (port 50061 by default)."""
    data_dir: Path = Path("var/registry")
    """Directory holding the database and the artifacts unless their own paths are set.
    One registry process per directory."""
    database_path: Path | None = None
    """The SQLite database file; unset means `<data_dir>/registry.sqlite3`."""
    artifacts_dir: Path | None = None
    """The content-addressed artifact directory; unset means `<data_dir>/artifacts`. It must be
    on one filesystem: uploads are written next to it and renamed into place."""
    max_artifact_bytes: int = Field(default=2 * 1024**3, gt=0)
    """Largest artifact an upload may carry; a larger one is refused with TOO_LARGE."""
    download_chunk_bytes: int = Field(default=1024 * 1024, gt=0, le=_MAX_DOWNLOAD_CHUNK_BYTES)
    """Bytes of artifact per download message (at most 4 MiB - 64 KiB, the default receive
    limit of gRPC clients less room for the header)."""
    redis_resync_interval_s: PositiveFloat = 5.0
    """How often every model's aliases are compared with Redis and rewritten where Redis lost
    or missed them (a FLUSHALL, a new Redis, an update made while Redis was down)."""

    retention_s: NonNegativeFloat = 600.0
    """How long a version stays placed (loaded and warm on the model servers) after an alias
    moved away from it, so that a rollback within this window is instant."""
    signing: SigningSettings = Field(default_factory=SigningSettings)
    """Trusted model signers (OpenSSF model signing), checked at every upload, e.g.
    `MODELYARD_REGISTRY_SIGNING__TRUSTED_PUBLIC_KEYS='["/etc/modelyard/ml-team.pub"]'`."""
    admin_key_file: Path | None = None
    """On the first start (no API key yet), write a new `admin` key here (owner-only);
    unset: `<data_dir>/admin.key`, unless `admin_key` is set."""
    admin_key: SecretStr | None = None
    """On the first start, adopt this token (`myk_...`, from a secret) as the `admin` key
    instead of making one."""
    promote_timeout_s: PositiveFloat = 120.0
    """How long PromoteVersion waits, by default, for the version to be ready on the model
    servers before it gives up (DEADLINE_EXCEEDED) without moving the alias."""
    proof_timeout_s: PositiveFloat = 120.0
    """How long the proof of a device, precision or optimization change (SetDeployment) waits
    for a model server to measure one version; beyond it the call fails with UNAVAILABLE and
    the deployment does not change."""

    @property
    def resolved_database_path(self) -> Path:
        """`database_path`, or its default under `data_dir`."""
        return self.database_path or self.data_dir / "registry.sqlite3"

    @property
    def resolved_admin_key_file(self) -> Path:
        """`admin_key_file`, or its default under `data_dir`."""
        return self.admin_key_file or self.data_dir / "admin.key"

    @property
    def resolved_artifacts_dir(self) -> Path:
        """`artifacts_dir`, or its default under `data_dir`."""
        return self.artifacts_dir or self.data_dir / "artifacts"
