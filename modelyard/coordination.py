"""All of Modelyard's Redis access: typed reads and writes, Lua scripts, change events.

Redis holds the *live* copy of routing state (aliases, epochs, membership); the registry's own
store is the source of truth and rewrites Redis from it. Alias maps are written whole, guarded
by the model's epoch: a write whose epoch is not newer than the stored one is ignored, so
concurrent or replayed writes can never move a pointer backwards.

Not supported: Redis Cluster (the alias script also touches the global models set and event
log). Use a single Redis, or Sentinel for high availability.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from pydantic import BaseModel, Field
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from modelyard.errors import CoordinationUnavailable
from modelyard.redis_keys import KeySchema
from modelyard.settings import RedisSettings

__all__ = [
    "CoordinationStore",
    "Deployment",
    "redis_client",
    "parse_sentinel_url",
    "ServiceRecord",
    "VersionRecord",
    "AliasesEvent",
    "ServiceEvent",
    "Event",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EVENTS_LOG_MAXLEN = 10_000


class VersionRecord(BaseModel):
    """One model version held by a model server, as its heartbeat reports it."""

    model: str
    version: int
    state: str
    """"loading", "ready", "unloading" or "failed"."""
    device: str = "cpu"
    outstanding: int = 0
    error: str = ""
    signature: dict[str, Any] = Field(default_factory=dict)
    """The version's signature as protobuf JSON (json_format.MessageToDict)."""
    platform: str = ""
    optimization: dict[str, Any] = Field(default_factory=dict)
    """The accuracy and speed report of its optimisation, measured at load (empty: none)."""


class Deployment(BaseModel):
    """How one model is served, written by the registry with the model's aliases and epoch.

    Model servers load `placed_versions` (on `replicas` of them, chosen by rendezvous hashing
    of the version over the live model servers; 0 = all) with these settings; gateways split
    traffic and mirror shadows by it. Unset serving fields mean the model server's defaults.
    """

    v: int = SCHEMA_VERSION
    placed_versions: list[int] = Field(default_factory=list)
    """Every version to keep loaded: aliased, pinned, and recently replaced (for rollback)."""
    replicas: int = 0
    """Model servers per placed version; 0 means every model server."""
    device: str | None = None
    """"cpu", "cuda", "cuda:N" or "auto"; unset: the model server's default."""
    precision: str | None = None
    """"fp32", "fp16" or "bf16"; unset: fp32."""
    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int | None = None
    instances: int | None = None
    traffic_split: dict[str, int] = Field(default_factory=dict)
    """Weights per alias for requests that select the default alias, e.g. {"production": 90,
    "canary": 10}; empty means all to the default alias."""
    shadow_alias: str = ""
    """An alias whose version receives a copy of `shadow_fraction` of the traffic; its answers
    are compared and recorded, never returned."""
    shadow_fraction: float = 0.0
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    """Batch sizes dispatched as soon as a group can fill one; empty: the model server's
    default."""
    execution: str | None = None
    """Where batches run: "auto", "loop" or "thread"; unset: the model server's default."""
    optimization: str | None = None
    """"none", "int8_dynamic", "freeze" or "compile"; unset: none."""
    max_abs_error: float | None = None
    """The largest absolute error against fp32 eager an optimised load may show; unset: any."""
    min_top1_agreement: float | None = None
    """The least top-1 agreement with fp32 eager an optimised load may show; unset: any."""


class ServiceRecord(BaseModel):
    """The membership record a service keeps fresh in Redis while it runs."""

    v: int = SCHEMA_VERSION
    id: str
    kind: str
    """"gateway", "model_server", "registry" or "monitor"."""
    address: str
    """host:port of its gRPC listener, as other services should dial it."""
    metrics_address: str = ""
    """host:port of its Prometheus /metrics endpoint; empty: none."""
    metrics_scheme: str = ""
    """"http", or "https" when its TLS is on; empty in records of older services."""
    software_version: str = ""
    start_time: float = 0.0
    heartbeat_time: float = 0.0
    draining: bool = False
    versions: list[VersionRecord] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)
    """Model servers: the devices it can run a version on ("cpu", "cuda:0", ...), which the
    registry's proof of a device change chooses by; empty in other services' records, and in
    those of model servers older than the field (taken as the CPU only)."""


class AliasesEvent(BaseModel):
    """A model's aliases changed."""

    v: int = SCHEMA_VERSION
    type: str = "aliases"
    model: str
    epoch: int
    aliases: dict[str, int]
    deployment: Deployment | None = None


class ServiceEvent(BaseModel):
    """A service joined, changed what it holds, or left."""

    v: int = SCHEMA_VERSION
    type: str = "service"
    id: str
    change: str
    """"up", "changed" or "down"."""


Event = AliasesEvent | ServiceEvent


def parse_event(payload: str) -> Event | None:
    """Decode an event; unknown types (from newer services) are skipped, not fatal."""
    data = json.loads(payload)
    kind = data.get("type")
    if kind == "aliases":
        return AliasesEvent.model_validate(data)
    if kind == "service":
        return ServiceEvent.model_validate(data)
    return None


def redis_client(settings: RedisSettings) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """A client for `settings.url`: `redis://`, `rediss://` (TLS with `settings.tls_*`; the
    user and password in the URL select an ACL user), `unix://`, or Sentinel as
    `redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`, which follows
    the current master through failovers (`rediss+sentinel://`: Sentinels and master over
    TLS, with the same `settings.tls_*` files).

    Returns:
        The client, and the extra clients it depends on (the Sentinels) to close with it.
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), settings.retries),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    }
    tls_sentinel = settings.url.startswith("rediss+sentinel://")
    if settings.url.startswith("rediss://") or tls_sentinel:
        # TLS: verify the server against the given CA (else the system's roots); present a
        # client certificate where the server asks for one (tls-auth-clients).
        options["ssl_cert_reqs"] = "required"
        if settings.tls_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.tls_ca_file)
        if settings.tls_cert_file is not None:
            options["ssl_certfile"] = str(settings.tls_cert_file)
        if settings.tls_key_file is not None:
            options["ssl_keyfile"] = str(settings.tls_key_file)
    if not (settings.url.startswith("redis+sentinel://") or tls_sentinel):
        return aioredis.Redis.from_url(settings.url, **options), []
    sentinels, service_name, db, password = parse_sentinel_url(settings.url)
    tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
    if tls_sentinel:
        options["ssl"] = True  # the master's pool then makes TLS connections
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves Sentinel.__init__ unannotated
        sentinels,
        sentinel_kwargs={
            "socket_timeout": settings.socket_timeout_s,
            "socket_connect_timeout": settings.socket_timeout_s,
            **({"ssl": True, **tls} if tls_sentinel else {}),
        },
    )
    client = sentinel.master_for(service_name, db=db, password=password, **options)
    return client, list(sentinel.sentinels)


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, int, str | None]:
    """(sentinel addresses, service name, db, password) of a `redis+sentinel://` URL."""
    parsed = urlsplit(url)
    password = unquote(parsed.password) if parsed.password else None
    hosts = parsed.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for part in hosts.split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {part!r} in {url!r} must be host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parsed.path.split("/") if p]
    if not path:
        raise ValueError(f"{url!r} names no Sentinel service: add /<service_name>")
    db = int(path[1]) if len(path) > 1 else 0
    return sentinels, path[0], db, password


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class CoordinationStore:
    """Typed async access to the cluster's Redis.

    Usage::

        async with CoordinationStore(settings.redis) as store:
            aliases, epoch = await store.get_aliases("demo")

    Raises `CoordinationUnavailable` (UNAVAILABLE) when Redis cannot be reached after retries.
    """

    # Replace a model's alias map (and deployment, when given) if, and only if, the incoming
    # epoch is newer. KEYS: aliases, epoch, models, events log, deployment. ARGV: epoch, model,
    # event json, channel, deployment json ("" leaves it as it is), then alias/version pairs.
    LUA_APPLY_ALIASES = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local incoming = tonumber(ARGV[1])
if incoming <= current then return 0 end
redis.call('DEL', KEYS[1])
if #ARGV > 5 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[5]) end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '10000', '*', 'event', ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1
"""

    # Everything routing reads, in one atomic step: a refresh never sees aliases from before a
    # FLUSHALL and services from after it. KEYS: models, services. ARGV: the model keys' head,
    # the aliases, epoch and deployment keys' tails, the service key's head and tail. Returns
    # {model, epoch, deployment json, alias, version, ...} per model, then the service records.
    LUA_ROUTING_SNAPSHOT = """
local out = {}
local models = redis.call('SMEMBERS', KEYS[1])
table.sort(models)
local per_model = {}
for _, model in ipairs(models) do
  local head = ARGV[1] .. model
  local row = {model, redis.call('GET', head .. ARGV[3]) or '0', redis.call('GET', head .. ARGV[4]) or ''}
  local aliases = redis.call('HGETALL', head .. ARGV[2])
  for i = 1, #aliases do row[#row + 1] = aliases[i] end
  per_model[#per_model + 1] = row
end
local records = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local record = redis.call('GET', ARGV[5] .. id .. ARGV[6])
  if record then records[#records + 1] = record end
end
return {per_model, records}
"""

    # The whole set of API keys, replaced at once when its epoch is newer. KEYS: the keys
    # hash, the epoch. ARGV: epoch, then key id / record json pairs.
    LUA_APPLY_ACCESS_KEYS = """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local incoming = tonumber(ARGV[1])
if incoming <= current then return 0 end
redis.call('DEL', KEYS[1])
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

    def __init__(self, settings: RedisSettings, *, client: aioredis.Redis | None = None) -> None:
        self._settings = settings
        self.keys = KeySchema(settings.key_prefix)
        self._client = client
        self._state = _State.UNOPENED
        self._apply_aliases: Any = None
        self._routing_snapshot: Any = None
        self._apply_access_keys: Any = None
        self._dependents: list[aioredis.Redis] = []

    async def open(self) -> CoordinationStore:
        """Connect (lazily: the first command dials) and register the scripts."""
        if self._state is not _State.UNOPENED:
            raise RuntimeError("Cannot open a CoordinationStore more than once.")
        if self._client is None:
            self._client, self._dependents = redis_client(self._settings)
        self._apply_aliases = self._client.register_script(self.LUA_APPLY_ALIASES)
        self._routing_snapshot = self._client.register_script(self.LUA_ROUTING_SNAPSHOT)
        self._apply_access_keys = self._client.register_script(self.LUA_APPLY_ACCESS_KEYS)
        self._state = _State.OPENED
        return self

    async def aclose(self) -> None:
        """Close the connection pool. Safe to call twice."""
        if self._state is _State.OPENED and self._client is not None:
            await self._client.aclose()
            for dependent in self._dependents:
                await dependent.aclose()
        self._state = _State.CLOSED

    async def __aenter__(self) -> CoordinationStore:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.shield(self.aclose())

    def __del__(self) -> None:
        if getattr(self, "_state", None) is _State.OPENED:
            warnings.warn("Unclosed CoordinationStore; call aclose()", ResourceWarning, stacklevel=1)

    @property
    def client(self) -> aioredis.Redis:
        if self._state is _State.UNOPENED:
            raise RuntimeError("Cannot use a CoordinationStore before open().")
        if self._state is _State.CLOSED or self._client is None:
            raise RuntimeError("Cannot use a CoordinationStore after aclose().")
        return self._client

    async def ping(self) -> None:
        """Check that Redis answers."""
        try:
            await self.client.ping()
        except RedisError as exc:
            raise CoordinationUnavailable(f"Redis at {self._redacted_url()} is unreachable: {exc}") from exc

    def _redacted_url(self) -> str:
        url = self._settings.url
        if "@" in url:
            scheme, rest = url.split("://", 1)
            return f"{scheme}://***@{rest.split('@', 1)[1]}"
        return url

    # -- aliases ---------------------------------------------------------------------------

    async def apply_aliases(
        self,
        model: str,
        aliases: dict[str, int],
        epoch: int,
        deployment: Deployment | None = None,
    ) -> bool:
        """Replace a model's alias map (and its deployment, if given) if `epoch` is newer than
        the stored one.

        Returns:
            True if it was applied, False if Redis already held this epoch or a newer one.
        """
        event = AliasesEvent(
            model=model, epoch=epoch, aliases=aliases, deployment=deployment
        ).model_dump_json()
        pairs: list[str | int] = []
        for name, version in sorted(aliases.items()):
            pairs += [name, version]
        try:
            applied = await self._apply_aliases(
                keys=[
                    self.keys.aliases(model),
                    self.keys.epoch(model),
                    self.keys.models(),
                    self.keys.events_log(),
                    self.keys.deployment(model),
                ],
                args=[
                    epoch,
                    model,
                    event,
                    self.keys.events_channel(),
                    deployment.model_dump_json() if deployment is not None else "",
                    *pairs,
                ],
            )
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot update aliases in Redis: {exc}") from exc
        return bool(applied)

    async def get_aliases(self, model: str) -> tuple[dict[str, int], int]:
        """A model's alias map and epoch ({} and 0 when Redis knows nothing of it)."""
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.keys.aliases(model))
                pipe.get(self.keys.epoch(model))
                raw_aliases, raw_epoch = await pipe.execute()
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot read aliases from Redis: {exc}") from exc
        return {k: int(v) for k, v in raw_aliases.items()}, int(raw_epoch or 0)

    async def list_models(self) -> list[str]:
        """Every model name Redis knows, sorted."""
        try:
            # decode_responses=True: Redis replies are str, which redis-py's types don't track.
            return sorted(cast("set[str]", await self.client.smembers(self.keys.models())))
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot list models in Redis: {exc}") from exc

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        """Alias map and epoch of every model, in one round trip after the model list."""
        models = await self.list_models()
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.hgetall(self.keys.aliases(model))
                    pipe.get(self.keys.epoch(model))
                raw = await pipe.execute()
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot read aliases from Redis: {exc}") from exc
        return {
            model: ({k: int(v) for k, v in raw[2 * i].items()}, int(raw[2 * i + 1] or 0))
            for i, model in enumerate(models)
        }

    async def routing_snapshot(
        self,
    ) -> tuple[dict[str, tuple[dict[str, int], int]], dict[str, Deployment], list[ServiceRecord]]:
        """What routing reads, read atomically (one Lua script): every model's aliases and
        epoch, its deployment (the default `Deployment()` when it has none), and every live
        service record."""
        keys = self.keys
        head, aliases_tail = keys.aliases("\0").split("\0")
        epoch_tail = keys.epoch("\0").split("\0")[1]
        deployment_tail = keys.deployment("\0").split("\0")[1]
        service_head, service_tail = keys.service("\0").split("\0")
        try:
            per_model, records = await self._routing_snapshot(
                keys=[keys.models(), keys.services()],
                args=[head, aliases_tail, epoch_tail, deployment_tail, service_head, service_tail],
            )
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot read the routing state from Redis: {exc}") from exc
        aliases: dict[str, tuple[dict[str, int], int]] = {}
        deployments: dict[str, Deployment] = {}
        for row in per_model:
            model, epoch, deployment, *pairs = row
            aliases[model] = ({pairs[i]: int(pairs[i + 1]) for i in range(0, len(pairs), 2)}, int(epoch))
            deployments[model] = Deployment.model_validate_json(deployment) if deployment else Deployment()
        return aliases, deployments, [ServiceRecord.model_validate_json(r) for r in records]

    # -- API keys ----------------------------------------------------------------------------

    async def apply_access_keys(self, records: dict[str, str], epoch: int) -> bool:
        """Replace the published API keys (key id -> record JSON) if `epoch` is newer than the
        stored one; True when written."""
        keys = self.keys
        args: list[Any] = [epoch]
        for key_id, record in records.items():
            args += [key_id, record]
        try:
            written = await self._apply_access_keys(keys=[keys.access_keys(), keys.access_epoch()], args=args)
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot publish the API keys to Redis: {exc}") from exc
        return bool(written)

    async def access_epoch(self) -> int | None:
        """The epoch of the published API keys; None when none are published."""
        try:
            value = await self.client.get(self.keys.access_epoch())
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot read the API keys' epoch from Redis: {exc}") from exc
        return int(value) if value is not None else None

    async def access_keys(self) -> tuple[int | None, dict[str, str]]:
        """The published API keys and their epoch, read in one transaction."""
        keys = self.keys
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(keys.access_epoch())
                pipe.hgetall(keys.access_keys())
                epoch, records = await pipe.execute()
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot read the API keys from Redis: {exc}") from exc
        return (int(epoch) if epoch is not None else None), {
            _text(k): _text(v) for k, v in (records or {}).items()
        }

    async def all_deployments(self) -> dict[str, Deployment]:
        """Every model's deployment; a model without one gets the default `Deployment()`."""
        models = await self.list_models()
        if not models:
            return {}
        try:
            raw = await self.client.mget([self.keys.deployment(m) for m in models])
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot read deployments from Redis: {exc}") from exc
        return {
            model: Deployment.model_validate_json(r) if r else Deployment()
            for model, r in zip(models, raw, strict=True)
        }

    # -- membership ------------------------------------------------------------------------

    async def heartbeat(self, record: ServiceRecord, ttl_s: float) -> None:
        """Write a service's record with a time to live, and mark it alive now."""
        record.heartbeat_time = time.time()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(self.keys.service(record.id), record.model_dump_json(), px=int(ttl_s * 1000))
                pipe.zadd(self.keys.services(), {record.id: int(record.heartbeat_time * 1000)})
                await pipe.execute()
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot write heartbeat to Redis: {exc}") from exc

    async def deregister(self, service_id: str) -> None:
        """Remove a service's record at once (clean shutdown) and tell the others."""
        event = ServiceEvent(id=service_id, change="down").model_dump_json()
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.service(service_id))
                pipe.zrem(self.keys.services(), service_id)
                pipe.publish(self.keys.events_channel(), event)
                await pipe.execute()
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot deregister from Redis: {exc}") from exc

    async def publish_service_change(self, service_id: str, change: str) -> None:
        """Tell subscribers that a service came up or changed what it holds."""
        event = ServiceEvent(id=service_id, change=change).model_dump_json()
        try:
            await self.client.publish(self.keys.events_channel(), event)
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot publish to Redis: {exc}") from exc

    async def list_services(self, *, include_expired_s: float = 0.0) -> list[ServiceRecord]:
        """Every live service record; ids whose records expired are pruned from the index.

        Args:
            include_expired_s: Keep index entries of services whose record expired less than
                this long ago (the monitor reports them as down instead of forgetting them).
        """
        try:
            ids = cast("list[str]", await self.client.zrange(self.keys.services(), 0, -1))
            if not ids:
                return []
            raw = await self.client.mget([self.keys.service(i) for i in ids])
            gone = [i for i, r in zip(ids, raw, strict=True) if r is None]
            if gone:
                # Only ids whose record is gone: a delete by score range would also drop the
                # live services, whose last heartbeat is older than "now" too, until they
                # heartbeat again (gateways would see no replica for up to an interval).
                cutoff = int((time.time() - include_expired_s) * 1000)
                scores = await self.client.zmscore(self.keys.services(), gone)
                stale = [i for i, s in zip(gone, scores, strict=True) if s is not None and s <= cutoff]
                if stale:
                    await self.client.zrem(self.keys.services(), *stale)
        except RedisError as exc:
            raise CoordinationUnavailable(f"cannot list services in Redis: {exc}") from exc
        return [ServiceRecord.model_validate_json(r) for r in raw if r is not None]

    # -- events ----------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        """Change events as they are published. Ends (raising) when the connection drops;
        callers resync from the keys and subscribe again."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.events_channel())
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                event = parse_event(message["data"])
                if event is not None:
                    yield event
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose unannotated


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
