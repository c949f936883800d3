"""The gateway's data plane: every call that reads the routing table or reaches a model server.

Both servicers (modelyard.v1 `InferenceService`, the Open Inference Protocol) only translate
and call in here. One call, top to bottom (`serve`)::

    1. resolve    selector -> Route(model, version, alias) and its ready replicas; a miss
                  refreshes the table once (a client that has just moved an alias)
    2. check      the inputs in full against the version's signature (`modelyard.validation`,
                  the same check a model server makes): a call that could hurt another
                  caller never gets further
    3. mirror     a copy to the shadow alias's version, in its own task (`gateway.shadow`)
    4. send       joined with other callers' compatible calls (`gateway.coalescer`), or alone,
                  through `gateway.dispatch` (replica choice, one safe retry, passive health)
    5. count      per model, version and alias, and the routing access log when enabled

Tensor bytes are never decoded: a PredictRequest's bytes plus an appended version field are
the InferRequest a model server takes (`gateway.forwarder`), and its answer's bytes are the
PredictResponse. Metric labels name only models and versions the table knows (a call that
resolves to nothing is counted under model "unknown" or version "unknown"), so no caller can
grow a scrape or the gateway's memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from gateway.coalescer import Coalescer, coalesce_key
from gateway.dispatch import Dispatcher
from gateway.forwarder import ChannelPool, append_version
from gateway.metrics import (
    SHADOW_ABS_DIFF,
    SHADOW_ABS_DIFF_MAX,
    SHADOW_COMPARISONS,
    RequestMetrics,
    ShadowDiffs,
)
from gateway.outlier import PassiveHealth
from gateway.replica_picker import ReplicaPicker
from gateway.router import Route, Router
from gateway.routing_table import Replica, RoutingSource, RoutingTable
from gateway.shadow import SendShadow, ShadowMirror, ShadowRecord
from modelyard import access
from modelyard.errors import (
    AliasNotFound,
    InvalidArgument,
    ModelNotFound,
    ModelyardError,
    NoReadyReplica,
    VersionNotFound,
)
from modelyard.rpc.errors import status_code_for
from modelyard.v1 import inference_service_pb2, model_server_service_pb2, tensor_pb2
from modelyard.validation import WireTensor

__all__ = ["Call", "GatewayDataPlane", "UNKNOWN_LABEL"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("modelyard.gateway.access")

UNKNOWN_LABEL = "unknown"
"""The metric label of a model or version a call named that the table does not know."""


@dataclass(slots=True)
class Call:
    """One inference call as the gateway routes it, whichever protocol it came by."""

    model: str
    version: int = 0
    alias: str = ""
    routing_key: str = ""
    inputs: Sequence[tensor_pb2.Tensor] = ()
    output_names: Sequence[str] = ()
    raw: bytes | None = None
    """The caller's PredictRequest-shaped bytes to forward (None: serialised here)."""
    echo_id: str = ""
    """The request id in the caller's message, which the answer carries."""
    wire: list[WireTensor] = field(default_factory=list)
    """The checked inputs, in signature order (filled by step 2)."""

    def forwarded(self, request_id: str) -> bytes:
        """The caller's bytes (or the call serialised), without the version field."""
        if self.raw is None:
            self.raw = model_server_service_pb2.InferRequest(
                model=self.model,
                inputs=self.inputs,
                output_names=self.output_names,
                request_id=request_id,
            ).SerializeToString()
        return self.raw


class GatewayDataPlane:
    """Routes inference calls and answers metadata (see the module docstring).

    Args:
        routes: Where the current routing table is read, and refreshed on a miss.
        router: Version selection.
        dispatcher: Replica choice, retry, passive health.
        shadow: Builds the shadow mirror from the send path it is given (default: ShadowMirror
            with its default tolerances).
        coalescer: Joins concurrent compatible calls; None sends every call alone.
        access_log_enabled: Log one line per routed call (no payloads).
    """

    def __init__(
        self,
        routes: RoutingSource,
        router: Router,
        dispatcher: Dispatcher,
        *,
        shadow: Callable[[SendShadow], ShadowMirror] = ShadowMirror,
        coalescer: Coalescer | None = None,
        access_log_enabled: bool = False,
    ) -> None:
        self.routes = routes
        self.router = router
        self.dispatcher = dispatcher
        self.shadow = shadow(self._send_version)
        self.coalescer = coalescer
        self._metrics = RequestMetrics()
        self._access_log_enabled = access_log_enabled

    @classmethod
    def build(
        cls,
        pool: ChannelPool,
        routes: RoutingSource,
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
    ) -> GatewayDataPlane:
        """A data plane from plain settings (the gateway's composition root, and tests)."""
        return cls(
            routes,
            Router(default_alias=default_alias),
            Dispatcher(pool, picker=picker, sticky_picker=sticky_picker, health=health),
            shadow=functools.partial(
                ShadowMirror,
                rtol=shadow_rtol,
                atol=shadow_atol,
                max_in_flight=shadow_max_in_flight,
                record_size=shadow_record_size,
                on_result=_count_shadow,
            ),
            coalescer=(
                Coalescer(max_in_flight=coalesce_max_in_flight, max_items=coalesce_max_items)
                if coalesce
                else None
            ),
            access_log_enabled=access_log_enabled,
        )

    @property
    def table(self) -> RoutingTable:
        """The routing table now."""
        return self.routes.table

    @property
    def health(self) -> PassiveHealth:
        return self.dispatcher.health

    # -- inference -------------------------------------------------------------------------

    async def predict(self, raw_request: bytes, timeout_s: float, request_id: str) -> bytes:
        """Route one PredictRequest (as bytes) and return the PredictResponse bytes.

        Raises:
            InvalidArgument: the bytes do not parse as a PredictRequest.
        """
        try:
            request = inference_service_pb2.PredictRequest.FromString(raw_request)
        except DecodeError as exc:
            raise InvalidArgument(
                f"the request bytes do not parse as modelyard.v1.PredictRequest: {exc}"[:300]
            ) from None
        # Predict reaches here as bytes: the caller's grant on the model is checked now.
        access.require("predict", request.model)
        selector = request.WhichOneof("version_selector")
        call = Call(
            request.model,
            request.version if selector == "version" else 0,
            request.alias if selector == "alias" else "",
            request.routing_key,
            request.inputs,
            request.output_names,
            raw_request,
            request.request_id,
        )
        return await self.serve(call, timeout_s, request_id)

    async def serve(self, call: Call, timeout_s: float, request_id: str) -> bytes:
        """Route one call (steps 1 to 5 of the module docstring) and return the InferResponse
        bytes.

        Raises:
            ModelyardError: a client mistake or an unroutable call (with its status).
            grpc.aio.AioRpcError: the model server's failure, relayed as it is.
        """
        start = time.perf_counter()
        route: Route | None = None
        code = "OK"
        result: bytes | None = None
        primary: asyncio.Future[bytes | None] | None = None
        try:
            route, replicas = await self._resolve(call)
            table = self.table
            check = table.checks.get((route.model, route.version))
            if check is not None:
                call.wire = check.check([WireTensor.of(t) for t in call.inputs])
                check.select_outputs(call.output_names)
            shadow_version = self.router.shadow_version(table, route)
            if shadow_version is not None:
                primary = asyncio.get_running_loop().create_future()
                mirrored = append_version(call.forwarded(request_id), shadow_version)
                if not self.shadow.mirror(
                    route.model, route.version, shadow_version, mirrored, primary, timeout_s, request_id
                ):
                    primary = None
            result = await self._send(route, replicas, call, timeout_s, request_id)
            return result
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            raise
        except ModelyardError as exc:
            code = status_code_for(exc).name
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
            self._count(call, route, code, time.perf_counter() - start, request_id)

    async def _resolve(self, call: Call) -> tuple[Route, list[Replica]]:
        """Step 1: the route and its ready replicas, refreshing the table once on a miss."""
        try:
            route = self.router.route(self.table, call.model, call.version, call.alias, call.routing_key)
            return route, self.table.ready_replicas(route.model, route.version)
        except (ModelNotFound, VersionNotFound, AliasNotFound, NoReadyReplica):
            # The table may be a moment behind Redis (an alias just moved, a version just
            # deployed): one refresh, shared by concurrent misses and rate-limited.
            if not await self.routes.refresh_on_miss():
                raise
        route = self.router.route(self.table, call.model, call.version, call.alias, call.routing_key)
        return route, self.table.ready_replicas(route.model, route.version)

    async def _send(
        self, route: Route, replicas: list[Replica], call: Call, timeout_s: float, request_id: str
    ) -> bytes:
        """Step 4: joined with other callers' calls when it may be, else alone."""
        forwarded = append_version(call.forwarded(request_id), route.version)
        key = (route.model, route.version)

        def current() -> list[Replica]:
            return self.table.replicas.get(key, [])

        keyed = (
            coalesce_key(route.model, route.version, call.wire, call.output_names)
            if self.coalescer is not None
            and call.wire
            and not call.routing_key
            and key in self.table.batchable
            else None
        )
        if keyed is None:
            return await self.dispatcher.send(
                route, replicas, current, forwarded, timeout_s, request_id, routing_key=call.routing_key
            )
        assert self.coalescer is not None

        async def send(request: bytes, timeout: float, rid: str, callers: int) -> bytes:
            return await self.dispatcher.send(
                route, current() or replicas, current, request, timeout, rid, callers=callers
            )

        return await self.coalescer.submit(
            keyed[0],
            keyed[1],
            model=route.model,
            version=route.version,
            inputs=call.wire,
            output_names=call.output_names,
            forwarded=forwarded,
            timeout_s=timeout_s,
            request_id=request_id,
            send=send,
            replicas=len(replicas),
            echo_id=call.echo_id,
        )

    async def _send_version(
        self, model: str, version: int, request: bytes, timeout_s: float, request_id: str
    ) -> bytes:
        """Send InferRequest bytes to some replica of a version (the shadow path)."""
        key = (model, version)
        replicas = self.table.ready_replicas(model, version)
        return await self.dispatcher.send(
            Route(model, version, ""),
            replicas,
            lambda: self.table.replicas.get(key, []),
            request,
            timeout_s,
            request_id,
        )

    def _count(self, call: Call, route: Route | None, code: str, seconds: float, request_id: str) -> None:
        """Step 5."""
        if route is not None:
            self._metrics.observe(route.model, str(route.version), route.alias, code, seconds)
        else:
            known = call.model in self.table.models
            model = call.model if known else UNKNOWN_LABEL
            self._metrics.observe(model, UNKNOWN_LABEL, "", code, seconds)
        if self._access_log_enabled:
            access_log.info(
                "model=%s version=%s alias=%s key=%s code=%s %.3fms request_id=%s",
                call.model[:64],
                route.version if route else call.version,
                route.alias if route else call.alias[:64],
                "yes" if call.routing_key else "no",
                code,
                seconds * 1000,
                request_id,
            )

    # -- metadata and readiness ------------------------------------------------------------

    def select(self, model: str, version: int, alias: str) -> int:
        """The version a selector means now (no traffic split)."""
        return self.router.select(self.table, model, version, alias)

    def metadata(self, model: str, version: int, alias: str) -> tuple[int, dict[str, Any], str, list[str]]:
        """(version, signature as JSON dict, platform, aliases) of a selected version."""
        table = self.table
        resolved = self.router.select(table, model, version, alias)
        entry = table.signatures.get((model, resolved))
        if entry is None:
            raise NoReadyReplica(
                f"no model server has {model[:64]} v{resolved} loaded, so its signature is not "
                "known yet; retry shortly",
                retry_after_s=0.5,
            )
        signature, platform = entry
        return resolved, signature, platform, table.aliases_of(model, resolved)

    def ready(self, model: str, version: int, alias: str) -> bool:
        """Whether a selected version has a ready replica."""
        try:
            resolved = self.select(model, version, alias)
            self.table.ready_replicas(model, resolved)
        except ModelyardError:
            return False
        return True

    def versions_of(self, model: str) -> list[int]:
        """The versions of a model ready on some replica."""
        return sorted({v for m, v in self.table.replicas if m == model})

    def replicas_of(self, model: str, version: int) -> list[Replica]:
        """The ready replicas of a version (NoReadyReplica if none)."""
        return self.table.ready_replicas(model, version)

    def held_versions(self) -> list[tuple[str, int]]:
        """Every (model, version) ready on some replica."""
        return sorted(self.table.replicas)

    async def call_replica(
        self, replica: Replica, method: str, request: bytes, timeout_s: float, request_id: str
    ) -> bytes:
        """A unary call of any method on a replica, bytes in and out (OIP ModelConfig and
        ModelStatistics are asked of the model servers)."""
        return await self.dispatcher.pool.call(replica.address, method, request, timeout_s, request_id)

    async def aclose(self) -> None:
        """Cancel running shadow copies and coalesced calls."""
        await self.shadow.aclose()
        if self.coalescer is not None:
            await self.coalescer.aclose()


_SHADOW_DIFFS = ShadowDiffs(SHADOW_ABS_DIFF_MAX)
"""One per process, like the metrics it publishes through."""


def _count_shadow(record: ShadowRecord) -> None:
    labels = (record.model, str(record.version), str(record.shadow_version))
    SHADOW_COMPARISONS.labels(*labels, record.outcome).inc()
    if record.max_abs_diff is not None and not math.isnan(record.max_abs_diff):
        SHADOW_ABS_DIFF.labels(*labels).observe(record.max_abs_diff)
        _SHADOW_DIFFS.observe(*labels, record.max_abs_diff)
