"""API keys and service tokens, and who a call is from (`Principal`).

An API key is the bearer token `myk_<key id>_<secret>`: the key id (12 characters) names the
key in lists, logs and the audit; the secret is 32 random bytes. The registry stores and
publishes only `sha256(token)`: the secret is shown once, when the key is made.

A service token is `mys_<kind>_<hmac>`: the cluster's own services (gateway, model server,
registry, monitor) prove that they are with an HMAC of their kind under the cluster secret
every service is given. Under mTLS a service is known by its certificate instead.

Pure logic: no grpc, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from modelyard.access.grants import Grants
from modelyard.errors import Unauthenticated

__all__ = [
    "KEY_PREFIX",
    "SERVICE_PREFIX",
    "KeyBook",
    "KeyRecord",
    "Principal",
    "ServiceTokens",
    "hash_token",
    "new_key_token",
    "key_id_of",
]

KEY_PREFIX = "myk_"
SERVICE_PREFIX = "mys_"
_KEY_ID = re.compile(r"[a-z0-9]{12}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_MAX_TOKEN_CHARS = 256


def new_key_token() -> tuple[str, str]:
    """A fresh (key id, token)."""
    key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def hash_token(token: str) -> str:
    """What the registry keeps of a token: its SHA-256, hex (the secret has 256 random bits,
    so a slow hash adds nothing)."""
    return hashlib.sha256(token.encode()).hexdigest()


def key_id_of(token: str) -> str | None:
    """The key id of a well-formed API key token, else None."""
    if not token.startswith(KEY_PREFIX) or len(token) > _MAX_TOKEN_CHARS:
        return None
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or _KEY_ID.fullmatch(key_id) is None or _SECRET.fullmatch(secret) is None:
        return None
    return key_id


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What gateways and model servers know of a key: never its secret."""

    key_id: str
    name: str
    token_hash: str
    grants: tuple[str, ...]
    expires_at: float = 0.0
    """Unix s after which the key is refused; 0: never."""
    rate_per_s: float = 0.0
    """Requests per second the gateway admits from this key; 0: the gateway's default."""
    max_concurrency: int = 0
    """Calls in flight the gateway admits from this key; 0: the gateway's default."""

    def to_json(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "token_hash": self.token_hash,
            "grants": list(self.grants),
            "expires_at": self.expires_at,
            "rate_per_s": self.rate_per_s,
            "max_concurrency": self.max_concurrency,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KeyRecord:
        return cls(
            key_id=str(data["key_id"]),
            name=str(data["name"]),
            token_hash=str(data["token_hash"]),
            grants=tuple(str(g) for g in data.get("grants", ())),
            expires_at=float(data.get("expires_at", 0.0)),
            rate_per_s=float(data.get("rate_per_s", 0.0)),
            max_concurrency=int(data.get("max_concurrency", 0)),
        )


@dataclass(frozen=True, slots=True, eq=False)
class Principal:
    """Who a call is from, as authentication found it."""

    name: str
    """`key:<name>` for an API key, `service:<kind>` for one of the cluster's services."""
    key_id: str = ""
    grants: Grants = field(default_factory=lambda: Grants(()))
    service: bool = False
    rate_per_s: float = 0.0
    max_concurrency: int = 0

    def allows(self, verb: str, model: str = "") -> bool:
        """Services may call everything; a key, what its grants say."""
        return self.service or self.grants.allows(verb, model)


def service_principal(kind: str) -> Principal:
    return Principal(name=f"service:{kind}", service=True)


class ServiceTokens:
    """Makes and checks the tokens of the cluster's services from the cluster secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the cluster secret must have at least 16 bytes")
        self._secret = secret
        self._principals: dict[str, Principal] = {}
        self._known: dict[str, Principal] = {}

    def token(self, kind: str) -> str:
        return f"{SERVICE_PREFIX}{kind}_{self._mac(kind)}"

    def _mac(self, kind: str) -> str:
        return hmac.new(self._secret, f"modelyard-service:{kind}".encode(), hashlib.sha256).hexdigest()

    def verify(self, token: str) -> Principal | None:
        """The service a token proves, or None (a proven token is remembered: the next call
        with it costs a dict lookup, not an HMAC)."""
        known = self._known.get(token)
        if known is not None:
            return known
        kind, sep, mac = token[len(SERVICE_PREFIX) :].rpartition("_")
        if not sep or not kind or len(kind) > 32 or not hmac.compare_digest(mac, self._mac(kind)):
            return None
        principal = self._principals.get(kind)
        if principal is None:
            principal = self._principals[kind] = service_principal(kind)
        if len(self._known) < 64:
            self._known[token] = principal
        return principal


class KeyBook:
    """The keys a service accepts, as last published; `authenticate` turns a token into a
    Principal or raises Unauthenticated."""

    def __init__(self, records: Iterable[KeyRecord] = (), *, epoch: int = 0) -> None:
        self.epoch = epoch
        self._records: dict[str, KeyRecord] = {}
        self._principals: dict[str, Principal] = {}
        self.replace(records, epoch=epoch)

    def __len__(self) -> int:
        return len(self._records)

    def replace(self, records: Iterable[KeyRecord], *, epoch: int) -> None:
        """Swap in a whole new set of keys (atomic for readers: one assignment each)."""
        by_id = {r.key_id: r for r in records}
        principals = {}
        for record in by_id.values():
            try:
                grants = Grants.parse(record.grants)
            except ValueError:
                continue  # a grant this version does not know: refuse the key, never widen it
            principals[record.key_id] = Principal(
                name=f"key:{record.name}",
                key_id=record.key_id,
                grants=grants,
                rate_per_s=record.rate_per_s,
                max_concurrency=record.max_concurrency,
            )
        self._records, self._principals, self.epoch = by_id, principals, epoch

    def expires_at(self, key_id: str) -> float:
        record = self._records.get(key_id)
        return record.expires_at if record is not None else 0.0

    def records(self) -> list[KeyRecord]:
        return list(self._records.values())

    def authenticate(self, token: str, now: float | None = None) -> Principal:
        key_id = key_id_of(token)
        if key_id is None:
            raise Unauthenticated(
                "the authorization metadata does not hold a Modelyard API key (expected"
                " 'Bearer myk_<key id>_<secret>')"
            )
        record = self._records.get(key_id)
        if record is None or not hmac.compare_digest(hash_token(token), record.token_hash):
            raise Unauthenticated(f"API key {key_id} is not valid: unknown or revoked")
        if record.expires_at and (time.time() if now is None else now) >= record.expires_at:
            expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires_at))
            raise Unauthenticated(f"API key {key_id} ({record.name[:64]}) expired at {expired}; rotate it")
        principal = self._principals.get(key_id)
        if principal is None:
            raise Unauthenticated(f"API key {key_id} has a grant this service does not know; it is refused")
        return principal
