"""The gateway's core: selector → version → replica → forward, with one safe retry.

Version selection: an explicit version wins, then an explicit alias; a request that selects
neither goes to the default alias, or is spread over the aliases of the model's traffic split
(`gateway.traffic`). Replica choice: least outstanding, or rendezvous hashing of the routing
key (sticky), over the replicas passive health has not ejected. A fraction of a model's calls
may be mirrored to its shadow alias (`gateway.shadow`).

No grpc here beyond what the forwarder raises; the servicers adapt it to the wire.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from gateway.coalescer import Coalescer, coalesce_key
from gateway.forwarder import ChannelPool, ReplicaUnavailable, append_version
from gateway.metrics import EJECTIONS, RETRIES, SHADOW_COMPARISONS, RequestMetrics
from gateway.outlier import PassiveHealth
from gateway.replica_picker import ConsistentHash, LeastOutstanding, ReplicaPicker
from gateway.routing_table import Replica, RoutingTable
from gateway.shadow import ShadowMirror, ShadowRecord
from gateway.traffic import TrafficSplitter
from modelyard.errors import (
    AliasNotFound,
    InvalidArgument,
    ModelNotFound,
    ModelyardError,
    NoReadyReplica,
)
from modelyard.rpc.errors import status_code_for
from modelyard.v1 import inference_service_pb2, tensor_pb2

__all__ = ["Router", "Route"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("modelyard.gateway.access")

# A failure of these codes counts against the replica's passive health; the others (bad
# input, deadline, queue full...) say nothing about whether the replica works.
_REPLICA_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


@dataclass(frozen=True, slots=True)
class Route:
    """Where a call goes: the model, the concrete version, and the alias that chose it ("" when
    the caller named the version)."""

    model: str
    version: int
    alias: str


class Router:
    """Routes Predict calls by the current routing table.

    Args:
        pool: Channels to model servers.
        default_alias: Alias used when a request selects nothing.
        picker: Replica choice for calls without a routing key.
        sticky_picker: Replica choice for calls with a routing key.
        health: Passive health (ejection of failing replicas).
        shadow_rtol: Relative tolerance when comparing shadow answers.
        shadow_atol: Absolute tolerance when comparing shadow answers.
        shadow_max_in_flight: Shadow copies running at once (more are skipped).
        shadow_record_size: How many shadow comparisons are kept in `shadow.records`.
        access_log_enabled: Log one line per routed call (no payloads).
        coalesce: Join concurrent compatible calls for a version into one model server call
            (`gateway.coalescer`).
        coalesce_max_items: Most batch items in one joined call.
        coalesce_max_in_flight: Calls per version and replica running at once before calls
            are grouped.
    """

    def __init__(
        self,
        pool: ChannelPool,
        *,
        default_alias: str = "production",
        picker: ReplicaPicker | None = None,
        sticky_picker: ReplicaPicker | None = None,
        health: PassiveHealth | None = None,
        shadow_rtol: float = 1e-4,
        shadow_atol: float = 1e-5,
        shadow_max_in_flight: int = 64,
        shadow_record_size: int = 1000,
        access_log_enabled: bool = False,
        coalesce: bool = False,
        coalesce_max_items: int = 64,
        coalesce_max_in_flight: int = 1,
    ) -> None:
        self.table = RoutingTable()
        self.on_miss: Callable[[], Awaitable[bool]] | None = None
        """Awaited when a request names a model, alias or version the table cannot route;
        True means the table was refreshed and the lookup is worth one more try."""
        self._pool = pool
        self._default_alias = default_alias
        self._picker = picker or LeastOutstanding()
        self._sticky = sticky_picker or ConsistentHash(self._picker)
        self.health = health or PassiveHealth(on_eject=_count_ejection)
        self._splitter = TrafficSplitter()
        self._shadow_credit: dict[str, float] = {}
        self.shadow = ShadowMirror(
            self._send_version,
            rtol=shadow_rtol,
            atol=shadow_atol,
            max_in_flight=shadow_max_in_flight,
            record_size=shadow_record_size,
            on_result=_count_shadow,
        )
        self._metrics = RequestMetrics()
        self._access_log_enabled = access_log_enabled
        self.coalescer = (
            Coalescer(max_in_flight=coalesce_max_in_flight, max_items=coalesce_max_items)
            if coalesce
            else None
        )

    # -- selection -------------------------------------------------------------------------

    def select(self, model: str, version: int, alias: str) -> int:
        """The version a selector means now (no traffic split: metadata, explicit calls)."""
        if not model:
            raise InvalidArgument("model is required", field="model")
        return self.table.resolve(model, version, alias or self._default_alias)

    def route(self, model: str, version: int, alias: str, routing_key: str = "") -> Route:
        """Resolve a call's selector, applying the model's traffic split when it selected
        nothing."""
        if not model:
            raise InvalidArgument("model is required", field="model")
        table = self.table
        if version:
            return Route(model, table.resolve(model, version, ""), "")
        if alias:
            return Route(model, table.resolve(model, 0, alias), alias)
        deployment = table.deployments.get(model)
        if deployment is not None and deployment.traffic_split:
            chosen = self._splitter.choose(model, deployment.traffic_split, routing_key)
            if chosen is not None:
                try:
                    return Route(model, table.resolve(model, 0, chosen), chosen)
                except AliasNotFound:
                    # A split naming an alias that is not set yet: its share goes to the
                    # default alias rather than failing.
                    pass
        alias = self._default_alias
        return Route(model, table.resolve(model, 0, alias), alias)

    def _shadow_version(self, route: Route) -> int | None:
        """The version to mirror this call to, or None. Mirrors exactly `shadow_fraction` of
        the calls (a credit counter, not a coin), and never a version to itself."""
        deployment = self.table.deployments.get(route.model)
        if deployment is None or not deployment.shadow_alias or deployment.shadow_fraction <= 0:
            return None
        credit = self._shadow_credit.get(route.model, 0.0) + min(deployment.shadow_fraction, 1.0)
        if credit < 1.0:
            self._shadow_credit[route.model] = credit
            return None
        self._shadow_credit[route.model] = credit - 1.0
        routes = self.table.models.get(route.model)
        target = routes.aliases.get(deployment.shadow_alias) if routes is not None else None
        if target is None or target == route.version:
            return None
        if not self.table.replicas.get((route.model, target)):
            return None
        return target

    # -- the call --------------------------------------------------------------------------

    async def predict(self, raw_request: bytes, timeout_s: float, request_id: str) -> bytes:
        """Route one PredictRequest (as bytes) and return the PredictResponse bytes."""
        request = inference_service_pb2.PredictRequest.FromString(raw_request)
        selector = request.WhichOneof("version_selector")
        return await self.forward(
            request.model,
            request.version if selector == "version" else 0,
            request.alias if selector == "alias" else "",
            request.routing_key,
            raw_request,
            timeout_s,
            request_id,
            inputs=request.inputs,
            output_names=request.output_names,
            echo_id=request.request_id,
        )

    async def forward(
        self,
        model: str,
        version: int,
        alias: str,
        routing_key: str,
        raw_request: bytes,
        timeout_s: float,
        request_id: str,
        *,
        inputs: Sequence[tensor_pb2.Tensor] = (),
        output_names: Sequence[str] = (),
        echo_id: str = "",
    ) -> bytes:
        """Route PredictRequest-shaped bytes (model, selector and tensors; the version field
        is appended here) and return the InferResponse bytes. Counted in the metrics.

        `inputs` and `output_names` (the decoded message's, when the caller has it) let the
        call be coalesced with others; without them it always goes alone. `echo_id` is the
        request id in the caller's message, which the answer carries."""
        start = time.perf_counter()
        route: Route | None = None
        code = "OK"
        result: bytes | None = None
        primary: asyncio.Future[bytes | None] | None = None
        try:
            try:
                route = self.route(model, version, alias, routing_key)
                replicas = self.table.ready_replicas(route.model, route.version)
            except (ModelNotFound, AliasNotFound, NoReadyReplica):
                if self.on_miss is None or not await self.on_miss():
                    raise
                route = self.route(model, version, alias, routing_key)
                replicas = self.table.ready_replicas(route.model, route.version)
            shadow_version = self._shadow_version(route)
            if shadow_version is not None:
                primary = asyncio.get_running_loop().create_future()
                if not self.shadow.mirror(
                    route.model,
                    route.version,
                    shadow_version,
                    append_version(raw_request, shadow_version),
                    primary,
                    timeout_s,
                    request_id,
                ):
                    primary = None
            forwarded = append_version(raw_request, route.version)
            keyed = (
                coalesce_key(route.model, route.version, inputs, output_names)
                if self.coalescer is not None
                and inputs
                and not routing_key
                and (route.model, route.version) in self.table.batchable
                else None
            )
            if keyed is not None:
                assert self.coalescer is not None
                chosen = route

                async def send(request: bytes, timeout: float, rid: str, callers: int) -> bytes:
                    current = self.table.replicas.get((chosen.model, chosen.version)) or replicas
                    return await self._forward(chosen, current, request, timeout, rid, "", callers)

                result = await self.coalescer.submit(
                    keyed[0],
                    keyed[1],
                    model=route.model,
                    version=route.version,
                    inputs=inputs,
                    output_names=output_names,
                    forwarded=forwarded,
                    timeout_s=timeout_s,
                    request_id=request_id,
                    send=send,
                    replicas=len(replicas),
                    echo_id=echo_id,
                )
            else:
                result = await self._forward(route, replicas, forwarded, timeout_s, request_id, routing_key)
            return result
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            raise
        except ModelyardError as exc:
            code = _code_of(exc)
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            if primary is not None:
                primary.set_result(result)
            elapsed = time.perf_counter() - start
            if route is not None:
                self._metrics.observe(route.model, route.version, route.alias, code, elapsed)
            if self._access_log_enabled:
                access_log.info(
                    "model=%s version=%s alias=%s key=%s code=%s %.3fms request_id=%s",
                    model,
                    route.version if route else version,
                    route.alias if route else alias,
                    "yes" if routing_key else "no",
                    code,
                    elapsed * 1000,
                    request_id,
                )

    async def _send_version(
        self, model: str, version: int, request: bytes, timeout_s: float, request_id: str
    ) -> bytes:
        """Send InferRequest bytes to some replica of a version (the shadow path)."""
        route = Route(model, version, "")
        replicas = self.table.ready_replicas(model, version)
        return await self._forward(route, replicas, request, timeout_s, request_id, "")

    async def _forward(
        self,
        route: Route,
        replicas: Sequence[Replica],
        forwarded: bytes,
        timeout_s: float,
        request_id: str,
        routing_key: str,
        callers: int = 1,
    ) -> bytes:
        picker = self._sticky if routing_key else self._picker
        replica = picker.choose(self.health.usable(replicas), key=routing_key)
        assert replica is not None  # ready_replicas is never empty
        try:
            return await self._send(replica, forwarded, timeout_s, request_id, callers)
        except ReplicaUnavailable as first:
            # The replica refused before doing any work: one retry on another replica.
            current = self.table.replicas.get((route.model, route.version), [])
            retry = picker.choose(self.health.usable(current), exclude=replica, key=routing_key)
            if retry is None:
                raise first.upstream from None
            log.debug("retrying %s v%s on %s: %s", route.model, route.version, retry.server_id, first)
            RETRIES.labels(route.model).inc()
            try:
                return await self._send(retry, forwarded, timeout_s, request_id, callers)
            except ReplicaUnavailable as second:
                raise second.upstream from None

    async def _send(
        self, replica: Replica, request: bytes, timeout_s: float, request_id: str, callers: int = 1
    ) -> bytes:
        # `outstanding` counts callers, not calls: a coalesced call weighs what it carries.
        replica.outstanding += callers
        try:
            response = await self._pool.infer(replica.address, request, timeout_s, request_id)
        except ReplicaUnavailable:
            self.health.failed(replica)
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _REPLICA_FAULTS:
                self.health.failed(replica)
            raise
        finally:
            replica.outstanding -= callers
        self.health.succeeded(replica)
        return response

    def metadata(self, model: str, version: int, alias: str) -> tuple[int, dict[str, Any], str, list[str]]:
        """(version, signature as JSON dict, platform, aliases) of a selected version."""
        resolved = self.select(model, version, alias)
        entry = self.table.signatures.get((model, resolved))
        if entry is None:
            raise NoReadyReplica(
                f"no model server has {model} v{resolved} loaded, so its signature is not known "
                "yet; retry shortly",
                retry_after_s=0.5,
            )
        signature, platform = entry
        return resolved, signature, platform, self.table.aliases_of(model, resolved)

    async def aclose(self) -> None:
        """Cancel running shadow copies and coalesced calls."""
        await self.shadow.aclose()
        if self.coalescer is not None:
            await self.coalescer.aclose()


def _code_of(exc: ModelyardError) -> str:
    return status_code_for(exc).name


def _count_ejection(replica: Replica) -> None:
    EJECTIONS.labels(replica.server_id).inc()


def _count_shadow(record: ShadowRecord) -> None:
    SHADOW_COMPARISONS.labels(
        record.model, str(record.version), str(record.shadow_version), record.outcome
    ).inc()
