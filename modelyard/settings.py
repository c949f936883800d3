"""Settings shared by every service. Each service subclasses `ServiceSettings` with its own
env prefix (`MODELYARD_GATEWAY_`, `MODELYARD_MODEL_SERVER_`, ...); nested fields use `__`,
for example `MODELYARD_GATEWAY_REDIS__URL=redis://redis:6379/0`.

Settings are built once in a service's `__main__` and passed down; nothing reads them globally.
A bad value fails at start-up with a message that names the environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, Field, PositiveFloat, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "RedisSettings",
    "TLSSettings",
    "SigningSettings",
    "AccessSettings",
    "ServerSettings",
    "ServiceSettings",
    "SettingsError",
    "load_settings",
]


class RedisSettings(BaseModel):
    """How a service reaches the cluster's Redis."""

    url: str = "redis://127.0.0.1:6379/0"
    """Redis URL (`redis://`, `rediss://` or `unix://`)."""
    key_prefix: str = Field(default="my", pattern=r"^[A-Za-z0-9_.-]+$")
    """Prefix of every Modelyard key, so several clusters can share one Redis."""
    socket_timeout_s: PositiveFloat = 2.0
    """Timeout of one Redis command."""
    retries: int = Field(default=3, ge=0)
    """Retries of a command on a connection error or timeout, with jittered backoff."""
    tls_ca_file: Path | None = None
    """PEM CA bundle to verify a `rediss://` server with; unset: the system's roots."""
    tls_cert_file: Path | None = None
    """PEM client certificate for a Redis that requires one (`tls-auth-clients yes`)."""
    tls_key_file: Path | None = None
    """Its private key."""


class TLSSettings(BaseModel):
    """TLS for a service's listener and its outgoing channels."""

    enabled: bool = False
    """Serve and dial with TLS."""
    cert_file: Path | None = None
    """PEM certificate chain of this service."""
    key_file: Path | None = None
    """PEM private key of this service."""
    ca_file: Path | None = None
    """PEM CA bundle used to verify peers."""
    client_auth_required: bool = False
    """Require client certificates (mTLS); the service kind they name is then checked
    against the service's table of callers (`modelyard.tls.CALLERS`)."""
    server_name: str | None = None
    """Name to verify the certificates of the services this one dials against, instead of
    the host it dials (unset: the host; certificates name the hosts they are reached by)."""
    expiry_warning_s: PositiveFloat = 14 * 24 * 3600.0
    """Log a warning when the certificate expires within this long (its expiry is also in
    /metrics as modelyard_tls_certificate_expiry_timestamp_seconds)."""

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.client_auth_required and self.ca_file is None:
            raise ValueError("tls.client_auth_required needs tls.ca_file")
        return self


class SigningSettings(BaseModel):
    """Whom the cluster trusts to sign models (OpenSSF model signing, verified offline). The
    registry verifies a version's signature at upload, and every model server again at every
    load; give both the same files."""

    trusted_public_keys: tuple[Path, ...] = ()
    """PEM files of elliptic-curve public keys whose key-based signatures are trusted
    (`model_signing sign key --private_key ...`)."""
    trusted_ca_certificates: tuple[Path, ...] = ()
    """PEM files of CA certificates; a certificate-based signature is trusted when its signing
    certificate chains to one of them (`model_signing sign certificate ...`)."""
    require_signatures: bool = False
    """Refuse every unsigned version, whatever its model says (otherwise only the models
    created with `require_signature` refuse them)."""


class AccessSettings(BaseModel):
    """Who may call what (see docs/security.md, "Access control")."""

    mode: Literal["enforce", "off", "insecure"] = "enforce"
    """`enforce`: every RPC but health needs an API key or a service token. `off`: anyone
    may call, and the service refuses to listen on anything but a loopback address.
    `insecure`: anyone may call, on any address (never in production)."""
    service_secret_file: Path | None = None
    """File holding the cluster secret the cluster's services prove themselves with (at least
    16 bytes; `modelyard up` makes one). Without it (and without `service_secret`) only mTLS
    certificates identify services, and internal RPCs refuse every plaintext call."""
    service_secret: SecretStr | None = None
    """The cluster secret itself (from a Kubernetes or Compose secret); the file wins."""
    key_refresh_interval_s: PositiveFloat = 0.5
    """How often a service checks Redis for changed keys; a revocation takes effect within
    about this long (plus one Redis round trip)."""
    reflection: Literal["open", "authenticated"] = "authenticated"
    """Server reflection: `open` to anyone, or to any valid key or service."""
    metrics: Literal["open", "authenticated"] = "open"
    """Prometheus /metrics: `open` (scrape from the cluster network only), or only with a
    bearer token: a service token or an API key with `monitor.read` (Prometheus:
    `authorization: {credentials_file: ...}`)."""
    default_rate_per_s: float = Field(default=0.0, ge=0.0)
    """Gateway: requests per second admitted from a key without its own limit; 0: no limit."""
    default_max_concurrency: int = Field(default=0, ge=0)
    """Gateway: calls in flight admitted from a key without its own limit; 0: no limit."""

    def secret(self) -> bytes | None:
        """The cluster secret, or None."""
        if self.service_secret_file is not None:
            return self.service_secret_file.read_bytes().strip()
        if self.service_secret is not None:
            return self.service_secret.get_secret_value().encode()
        return None


class ServerSettings(BaseModel):
    """The gRPC listener of a service."""

    host: str = "127.0.0.1"
    """Address to listen on; "0.0.0.0" or "[::]" to accept remote clients."""
    port: int = Field(default=0, ge=0, le=65535)
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    """Prometheus /metrics port; unset means the gRPC port + 1000, 0 a free one."""
    advertise_host: str | None = None
    """Host other services use to reach this one; unset means `host` (or 127.0.0.1)."""
    drain_grace_s: PositiveFloat = 10.0
    """On SIGTERM, how long in-flight calls get to finish."""
    max_message_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    """Largest gRPC message accepted or sent (the gRPC default of 4 MiB is too small for tensors)."""
    access_log_enabled: bool = False
    """Log one line per RPC (method, status, duration, request id; never payloads)."""
    heartbeat_interval_s: PositiveFloat = 1.0
    """How often the service refreshes its membership record in Redis."""
    heartbeat_ttl_s: PositiveFloat = 5.0
    """A service that missed heartbeats for this long is considered gone."""


class ServiceSettings(BaseSettings):
    """What every service has: its listener, Redis and TLS."""

    model_config = SettingsConfigDict(env_prefix="MODELYARD_", env_nested_delimiter="__", extra="ignore")
    default_port: ClassVar[int] = 0
    """The service's well-known port, kept when only some SERVER__* variables are set."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    """The gRPC listener."""
    redis: RedisSettings = Field(default_factory=RedisSettings)
    """The cluster's Redis."""
    tls: TLSSettings = Field(default_factory=TLSSettings)
    """TLS for listener and channels."""
    access: AccessSettings = Field(default_factory=AccessSettings)
    """Access control: API keys, service tokens, per-key limits."""
    service_id: str | None = None
    """Unique id of this process in the cluster; unset means kind + random suffix."""

    @model_validator(mode="before")
    @classmethod
    def _keep_default_port(cls, data: Any) -> Any:
        # Any SERVER__* variable makes `server` arrive as a dict, which bypasses a subclass's
        # default factory and would leave ServerSettings' own port 0 (a random port).
        if not isinstance(data, dict) or not cls.default_port:
            return data
        server = data.get("server")
        if server is None:
            return {**data, "server": {"port": cls.default_port}}
        if isinstance(server, dict) and "port" not in server:
            return {**data, "server": {**server, "port": cls.default_port}}
        return data


class SettingsError(Exception):
    """A setting has a bad value; the message names the environment variable."""


S = TypeVar("S", bound=ServiceSettings)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment, turning validation errors into one readable message."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        problems = []
        for err in exc.errors():
            path = "__".join(str(p) for p in err["loc"]).upper()
            problems.append(f"  {prefix}{path}: {err['msg']} (got {err.get('input')!r})")
        raise SettingsError("invalid settings:\n" + "\n".join(problems)) from None
