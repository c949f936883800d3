"""TLS material in one place: server and channel credentials, certificate reload, the peer's
service kind, and a local CA for `modelyard up --tls` and the tests.

Every listener and every channel of the cluster is made through this module, so plaintext and
TLS differ in one place:

- `server_credentials(tls)` for a listener: TLS, or mTLS when `tls.client_auth_required`,
  reloaded without a restart when the files change (`grpc.dynamic_ssl_server_credentials`
  with a fetcher that rereads them when their mtime moves).
- `open_channel(address, client_tls)` (and `open_sync_channel`) for every client: the
  gateway's channel pool, the model server's registry client, the monitor, the CLI,
  `modelyard top`, the load tests and the supervisor's readiness checks.
- `PeerKindInterceptor` for internal RPCs: each service presents a certificate whose SAN URI is
  `spiffe://modelyard/<kind>`, and a service accepts a call only from the kinds its
  `CALLERS` table allows (PERMISSION_DENIED otherwise).
- `LocalCA` makes a CA and per-kind certificates with `cryptography`.

Usage::

    client_tls = ClientTLS.from_settings(settings.tls)      # None: plaintext
    channel = open_channel("127.0.0.1:50061", client_tls)
"""

from __future__ import annotations

import contextvars
import datetime
import inspect
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeAlias, cast

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import Gauge

from modelyard.rpc import keepalive
from modelyard.rpc.client_name import user_agent_options
from modelyard.rpc.handlers import behavior_of, factory_of
from modelyard.settings import TLSSettings

__all__ = [
    "ANY_KIND",
    "CALLERS",
    "CLIENT_KIND",
    "CERT_EXPIRY",
    "SERVICE_KINDS",
    "CertificateReloader",
    "ClientTLS",
    "ClientTLSWatch",
    "HTTPSReloader",
    "IssuedCertificate",
    "LocalCA",
    "PeerKindInterceptor",
    "certificate_expiry",
    "channel_credentials",
    "kind_uri",
    "https_context",
    "open_channel",
    "open_sync_channel",
    "peer_kind",
    "peer_kind_var",
    "server_credentials",
    "write_private",
]

log = logging.getLogger(__name__)

SERVICE_KINDS = ("gateway", "model_server", "registry", "monitor")
"""The kinds of the cluster's own services; each presents a certificate naming its kind."""
CLIENT_KIND = "client"
"""The kind in the certificate `modelyard up --tls` writes for the CLI, `modelyard top` and the
load tests."""
SPIFFE_TRUST_DOMAIN = "modelyard"

ANY_KIND: frozenset[str] = frozenset({"*"})
"""A service open to every peer the TLS handshake accepted."""

CALLERS: dict[str, dict[str, frozenset[str]]] = {
    # Clients call the gateway: the data plane is open to every authenticated peer.
    "gateway": {
        "modelyard.v1.InferenceService": ANY_KIND,
        "inference.GRPCInferenceService": ANY_KIND,
    },
    # A model server takes inference only from the gateway, and status calls from the monitor;
    # the registry may ask it only to measure a version (the proof of a deployment change).
    "model_server": {
        "modelyard.v1.ModelServerService": frozenset({"gateway", "monitor"}),
        "modelyard.v1.ModelServerService/EvaluateOptimizations": frozenset(
            {"gateway", "monitor", "registry"}
        ),
        "inference.GRPCInferenceService": frozenset({"gateway", "monitor"}),
    },
    # Who may write what is the access-control issue's; here any authenticated peer.
    "registry": {"modelyard.v1.RegistryService": ANY_KIND},
    "monitor": {"modelyard.v1.MonitorService": ANY_KIND},
}
"""Server kind → gRPC service (or "service/Method", which takes precedence for that method)
→ the peer kinds allowed to call it under mTLS. A service not listed (health, reflection) is
open to every authenticated peer."""

CERT_EXPIRY = Gauge(
    "modelyard_tls_certificate_expiry_timestamp_seconds",
    "When the certificate a service presents stops being valid (Unix time).",
    ["service_kind", "file"],
)
CERT_RELOADS = Gauge(
    "modelyard_tls_certificate_reloads",
    "Times the service reloaded its certificate files without a restart.",
    ["service_kind"],
)

peer_kind_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer_kind", default=None)
"""The service kind of the peer of the current RPC (None: plaintext or no client certificate)."""


def kind_uri(kind: str) -> str:
    """The SAN URI naming a service kind: `spiffe://modelyard/<kind>`."""
    return f"spiffe://{SPIFFE_TRUST_DOMAIN}/{kind}"


# --- Certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate and its key as PEM files."""

    cert_file: Path
    key_file: Path


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable only by its owner, replacing it atomically (a reader, such as a
    reloading server, never sees half a key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    partial.replace(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


class LocalCA:
    """A small certificate authority kept as two PEM files (`ca.pem`, `ca-key.pem`).

    Usage::

        ca = LocalCA.create(Path("var/tls"))          # or LocalCA.load(...)
        ca.issue("gateway", hosts=["127.0.0.1", "localhost"])   # gateway.pem, gateway-key.pem

    Args:
        directory: Where the CA's files and the certificates it issues go.
        cert: The CA certificate.
        key: Its private key.
    """

    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.directory = directory
        self.cert = cert
        self._key = key

    @property
    def cert_file(self) -> Path:
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, *, name: str = "Modelyard local CA", days: int = 3650) -> LocalCA:
        """Make a new CA (a P-256 key and a self-signed certificate) in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(directory / "ca-key.pem", _key_pem(key))
        write_private(directory / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, cert, key)

    @classmethod
    def load(cls, directory: Path) -> LocalCA:
        """The CA kept in `directory` (by `create`).

        Raises:
            OSError: its files cannot be read.
            ValueError: they are not a CA certificate and an EC key.
        """
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / 'ca-key.pem'}: not an EC private key")
        return cls(directory, cert, key)

    @staticmethod
    def issued_in(directory: Path, name: str) -> IssuedCertificate:
        """Where `issue(..., name=name)` (or `issue(name)`) put its files in `directory`."""
        return IssuedCertificate(directory / f"{name}.pem", directory / f"{name}-key.pem")

    def issued(self, name: str) -> IssuedCertificate:
        """Where this CA's `issue(..., name=name)` put its files."""
        return self.issued_in(self.directory, name)

    def issued_this(self, cert_file: Path) -> bool:
        """Whether the certificate in `cert_file` was signed by this CA."""
        try:
            x509.load_pem_x509_certificate(cert_file.read_bytes()).verify_directly_issued_by(self.cert)
        except (OSError, ValueError, TypeError, InvalidSignature):
            return False
        return True

    @classmethod
    def load_or_create(cls, directory: Path) -> LocalCA:
        """The CA in `directory`, made first if there is none."""
        if (directory / "ca.pem").exists() and (directory / "ca-key.pem").exists():
            return cls.load(directory)
        return cls.create(directory)

    def issue(
        self,
        kind: str,
        *,
        hosts: Sequence[str] = ("127.0.0.1", "localhost"),
        name: str | None = None,
        days: float = 90.0,
        not_before: datetime.datetime | None = None,
    ) -> IssuedCertificate:
        """Issue a certificate for one service kind (or `client`), usable on both ends of a
        connection (server and client auth), and write `<name>.pem` / `<name>-key.pem`.

        Args:
            kind: Put in the SAN URI `spiffe://modelyard/<kind>` and the OU.
            hosts: DNS names and IP addresses the holder is dialled by (SAN).
            name: File name stem and common name; unset: the kind.
            days: Validity (fractions allowed, for tests of expiry).
            not_before: Start of validity; unset: five minutes ago (clock skew).
        """
        stem = name or kind
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                x509.NameAttribute(NameOID.COMMON_NAME, stem),
            ]
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(kind_uri(kind))]
        sans += [_san_entry(host) for host in dict.fromkeys(hosts)]
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        issued = self.issued(stem)
        # Key first: a reloading server that sees the new certificate must find its key.
        write_private(issued.key_file, _key_pem(key))
        write_private(issued.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return issued


def certificate_expiry(cert_file: Path) -> datetime.datetime:
    """When the first certificate in a PEM file stops being valid (UTC)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.not_valid_after_utc


# --- Server credentials --------------------------------------------------------------------


class CertificateReloader:
    """Rereads a listener's certificate, key and CA when one of their mtimes changes.

    gRPC calls `fetch` for every new handshake (from its own thread); it answers None while
    nothing changed, so the check costs a few `stat` calls. Existing connections keep the
    certificate they were made with, so a rotation fails no call.

    Args:
        tls: The listener's settings (cert, key, CA files).
        kind: The service kind, for the metrics' labels.
        clock: Wall clock (tests).
    """

    def __init__(self, tls: TLSSettings, *, kind: str = "", clock: Callable[[], float] = time.time) -> None:
        assert tls.cert_file is not None and tls.key_file is not None  # checked by TLSSettings
        self._cert_file = tls.cert_file
        self._key_file = tls.key_file
        self._ca_file = tls.ca_file
        self._kind = kind
        self._warn_before_s = tls.expiry_warning_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._last_warning = 0.0
        self.reloads = 0
        self.expires_at = 0.0
        self.initial = self._configuration()

    def _files(self) -> list[Path]:
        return [p for p in (self._cert_file, self._key_file, self._ca_file) if p is not None]

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(p.stat().st_mtime_ns for p in self._files())

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert = self._cert_file.read_bytes()
        key = self._key_file.read_bytes()
        root = self._ca_file.read_bytes() if self._ca_file is not None else None
        certificate = x509.load_pem_x509_certificate(cert)
        # The files are replaced one at a time: a new key beside the old certificate (or the
        # reverse) is a pair that fails every handshake, so it is not taken (until both match).
        private_key = serialization.load_pem_private_key(key, password=None)
        if private_key.public_key() != certificate.public_key():
            raise ValueError(f"{self._key_file} is not the key of {self._cert_file} (yet)")
        self.expires_at = certificate.not_valid_after_utc.timestamp()
        CERT_EXPIRY.labels(self._kind, str(self._cert_file)).set(self.expires_at)
        self.check_expiry()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=root)

    def check_expiry(self) -> float:
        """Log a warning (at most hourly) when the certificate expires within the warning
        window; return the seconds left."""
        left = self.expires_at - self._clock()
        if left < self._warn_before_s and self._clock() - self._last_warning > 3600:
            self._last_warning = self._clock()
            log.warning(
                "the TLS certificate %s expires in %.1f h (%s); rotate it (files are reloaded "
                "without a restart)",
                self._cert_file,
                left / 3600,
                datetime.datetime.fromtimestamp(self.expires_at, datetime.UTC).isoformat(),
            )
        return left

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed since the last call, else None."""
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                self.check_expiry()
                return None
            with self._lock:
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
                self._stamp = stamp
                self.reloads += 1
                CERT_RELOADS.labels(self._kind).set(self.reloads)
        except (OSError, ValueError) as exc:
            # Half-written or missing files: keep serving with the last good certificate.
            log.warning("TLS certificate reload failed, keeping the current one: %s", exc)
            return None
        log.info("reloaded the TLS certificate %s", self._cert_file)
        return configuration


def server_credentials(tls: TLSSettings, *, kind: str = "") -> grpc.ServerCredentials | None:
    """Credentials for a listener: None for plaintext, TLS, or mTLS (client certificates
    required and verified against `tls.ca_file`), reloaded when the files change."""
    if not tls.enabled:
        return None
    reloader = CertificateReloader(tls, kind=kind)
    # cast: the stubs type the fetcher's result without None, which gRPC takes as "no change".
    fetch = cast("Callable[[], grpc.ServerCertificateConfiguration]", reloader.fetch)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial,
        fetch,
        require_client_authentication=tls.client_auth_required,
    )


class HTTPSReloader:
    """The same reload for an HTTPS listener (`/metrics`): installed as the SNI callback of
    its SSL context, it swaps in a context with the new files for each handshake after they
    changed (Python calls the callback for every ClientHello, with or without SNI).

    Args:
        tls: The listener's settings.
    """

    def __init__(self, tls: TLSSettings) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._context: ssl.SSLContext | None = None

    def _mtimes(self) -> tuple[int, ...]:
        files = [p for p in (self._tls.cert_file, self._tls.key_file, self._tls.ca_file) if p is not None]
        return tuple(p.stat().st_mtime_ns for p in files)

    def server_context(self) -> ssl.SSLContext:
        """A server context for the files as they are now."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self._tls.ca_file is not None:
            context.load_verify_locations(cafile=str(self._tls.ca_file))
        if self._tls.client_auth_required:
            context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(self._tls.cert_file), str(self._tls.key_file))
        return context

    def sni_callback(
        self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        try:
            stamp = self._mtimes()
            with self._lock:
                if stamp != self._stamp:
                    self._context = self.server_context()  # raises on a mismatched pair
                    self._stamp = stamp
                    log.info("reloaded the HTTPS certificate %s", self._tls.cert_file)
                context = self._context
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("HTTPS certificate reload failed, keeping the current one: %s", exc)
            return
        if context is not None:
            sock.context = context


# --- Channel credentials -------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs to dial a TLS service: the CA that signed the servers' certificates
    and, for mTLS, its own certificate and key.

    Args:
        ca_file: PEM CA bundle; unset: the system's roots.
        cert_file: Client certificate chain (mTLS).
        key_file: Its private key.
        server_name: Name to check the server's certificate against instead of the host
            dialled (e.g. dialling an IP whose certificate names only a DNS name).
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_settings(cls, tls: TLSSettings) -> ClientTLS | None:
        """A service's channels: its own certificate doubles as its client certificate."""
        if not tls.enabled:
            return None
        return cls(tls.ca_file, tls.cert_file, tls.key_file, tls.server_name)

    ENV: ClassVar[dict[str, str]] = {
        "ca_file": "MODELYARD_TLS_CA_FILE",
        "cert_file": "MODELYARD_TLS_CERT_FILE",
        "key_file": "MODELYARD_TLS_KEY_FILE",
        "server_name": "MODELYARD_TLS_SERVER_NAME",
    }
    """The environment variables a client process (a locust worker) reads its TLS from."""

    def to_env(self) -> dict[str, str]:
        return {self.ENV[k]: v for k, v in self.to_json().items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ClientTLS | None:
        """TLS from `MODELYARD_TLS_*` (None when no CA file is named: plaintext)."""
        if not environ.get(cls.ENV["ca_file"]):
            return None
        return cls.from_json({k: environ.get(v, "") for k, v in cls.ENV.items()})

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClientTLS:
        def path(key: str) -> Path | None:
            return Path(str(data[key])) if data.get(key) else None

        name = data.get("server_name")
        return cls(path("ca_file"), path("cert_file"), path("key_file"), str(name) if name else None)


class ClientTLSWatch:
    """Tells long-lived channels when a client's TLS files changed, so they can be opened
    again with the new certificate: gRPC fixes channel credentials when a channel is made, and
    a channel reconnects with them until it is closed (past their expiry, it cannot).

    `generation()` moves when a file's mtime moved; the files are checked at most every
    `interval_s`, so calling it per request costs a clock read.

    Args:
        client_tls: The files to watch.
        interval_s: Least time between two checks.
        clock: Monotonic clock (tests).
    """

    def __init__(
        self, client_tls: ClientTLS, *, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._files = [p for p in (client_tls.ca_file, client_tls.cert_file, client_tls.key_file) if p]
        self._interval_s = interval_s
        self._clock = clock
        self._next_check = clock() + interval_s
        self._stamp = self._mtimes()
        self._generation = 0

    def _mtimes(self) -> tuple[int, ...]:
        try:
            return tuple(p.stat().st_mtime_ns for p in self._files)
        except OSError:
            return ()  # a file being replaced: looked at again on the next check

    def generation(self) -> int:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._interval_s
            stamp = self._mtimes()
            if stamp and stamp != self._stamp:
                self._stamp = stamp
                self._generation += 1
        return self._generation


def channel_credentials(client_tls: ClientTLS) -> grpc.ChannelCredentials:
    """Channel credentials from the files (read now: a rotated client certificate is used by
    the channels opened after the rotation)."""
    return grpc.ssl_channel_credentials(
        root_certificates=client_tls.ca_file.read_bytes() if client_tls.ca_file else None,
        private_key=client_tls.key_file.read_bytes() if client_tls.key_file else None,
        certificate_chain=client_tls.cert_file.read_bytes() if client_tls.cert_file else None,
    )


def _options(client_tls: ClientTLS | None, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out = list(options)
    if client_tls is not None and client_tls.server_name:
        out.append(("grpc.ssl_target_name_override", client_tls.server_name))
    return out


def _with_keepalive(options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`options` plus the cluster's keepalive (`modelyard.rpc.keepalive`), which every server
    accepts; an option the caller set wins."""
    given = {name for name, _ in options}
    return [*options, *(o for o in keepalive.client_options() if o[0] not in given)]


def open_channel(
    address: str,
    client_tls: ClientTLS | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    token: str | None = None,
    client: str | None = None,
) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS when `client_tls` is given, else plaintext; with
    `token`, every call carries it as a bearer token (an API key or a service token); with
    `client`, every call's user-agent names the client ("monitor", "demo"...): a claim the
    registry shows only with access control off, labelled (`modelyard.rpc.client_name`)."""
    options = _with_keepalive([*options, *user_agent_options(client)])
    if token:
        from modelyard.access.client import bearer  # access imports this module

        interceptors = [*(interceptors or ()), *(bearer(token) or ())]
    if client_tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(
        address,
        channel_credentials(client_tls),
        options=_options(client_tls, options),
        interceptors=interceptors,
    )


def open_sync_channel(
    address: str,
    client_tls: ClientTLS | None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    client: str | None = None,
) -> grpc.Channel:
    """A blocking channel (locust users, the container health check), as `open_channel`."""
    options = _with_keepalive([*options, *user_agent_options(client)])
    if client_tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(
        address, channel_credentials(client_tls), options=_options(client_tls, options)
    )


def https_context(client_tls: ClientTLS) -> ssl.SSLContext:
    """An SSL context for HTTPS clients (the monitor's /metrics scrapes), as `open_channel`."""
    context = ssl.create_default_context(cafile=str(client_tls.ca_file) if client_tls.ca_file else None)
    if client_tls.cert_file is not None and client_tls.key_file is not None:
        context.load_cert_chain(str(client_tls.cert_file), str(client_tls.key_file))
    return context


# --- Peer identity -------------------------------------------------------------------------


def _kind_from_names(uris: Iterable[bytes]) -> str | None:
    prefix = f"spiffe://{SPIFFE_TRUST_DOMAIN}/".encode()
    for uri in uris:
        if uri.startswith(prefix):
            return uri[len(prefix) :].decode(errors="replace")
    return None


def peer_kind(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The service kind in the peer's certificate (its `spiffe://modelyard/<kind>` SAN URI),
    or None without a verified client certificate."""
    # peer_identities() is the SAN list of a TLS peer (the CN when it has none) and costs
    # about 1 us; auth_context() builds a dict with the whole PEM certificate (about 9 us).
    return _kind_from_names(context.peer_identities() or ())


# A string: grpc.RpcMethodHandler is generic only in the stubs, not at runtime.
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class PeerKindInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only when the peer's certificate names a kind the service allows.

    The check runs for every call, before the handler (the decision is never cached: only the
    wrapped handler is); a refused call ends with PERMISSION_DENIED and no servicer code runs.
    The peer's kind is handed on in `peer_kind_var`.

    Args:
        allowed: gRPC service name, or "service/Method" for one method (it takes precedence
            over its service's entry) → allowed kinds (`ANY_KIND`: every authenticated peer).
            Services not listed are open to every authenticated peer.
    """

    def __init__(self, allowed: Mapping[str, frozenset[str]]) -> None:
        self._allowed = dict(allowed)
        self._cache: dict[str, tuple[_Handler, _Handler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        service = method.lstrip("/").partition("/")[0]
        kinds = self._allowed.get(method.lstrip("/"))
        if kinds is None:
            kinds = self._allowed.get(service, ANY_KIND)
        if kinds is ANY_KIND or "*" in kinds:
            return handler
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _guard(handler, kinds, method)
        self._cache[method] = (handler, wrapped)
        return wrapped


def _guard(handler: _Handler, kinds: frozenset[str], method: str) -> _Handler:
    behavior, factory = behavior_of(handler), factory_of(handler)
    allowed = ", ".join(sorted(kinds))

    async def refuse_unless_allowed(context: Any) -> None:
        kind = peer_kind(context)
        if kind not in kinds:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} takes calls only from {allowed}; the peer's certificate names "
                f"{kind or 'no service kind'}",
            )
        peer_kind_var.set(kind)

    if inspect.isasyncgenfunction(behavior):

        async def guarded_stream(request: Any, context: Any) -> Any:
            await refuse_unless_allowed(context)
            async for item in behavior(request, context):
                yield item

        wrapped: Any = guarded_stream
    else:

        async def guarded(request: Any, context: Any) -> Any:
            await refuse_unless_allowed(context)
            return await behavior(request, context)

        wrapped = guarded
    return factory(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
