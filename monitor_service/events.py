"""The event feed of WatchEvents: the cluster's Redis events channel plus the monitor's own.

Alert, canary and shadow events are decisions worth keeping: they are appended to the Redis
events log and published on the channel (`{"v": 1, "type": "alert" | "canary" | "shadow",
...}`; other services skip types they do not know). Version loads and unloads are what the
monitor infers from membership; they are only fanned out to this monitor's watchers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from modelyard.coordination import CoordinationStore, ServiceRecord

__all__ = ["EventBus", "FeedEvent", "summarize"]

log = logging.getLogger(__name__)

_QUEUE_LIMIT = 1000
_EVENTS_LOG_MAXLEN = 10_000


@dataclass(frozen=True)
class FeedEvent:
    """One event as WatchEvents sends it."""

    time: float
    type: str
    model: str
    summary: str
    payload: dict[str, Any]


def summarize(payload: dict[str, Any]) -> FeedEvent:
    """A feed event from an event payload, with a one-line summary."""
    kind = str(payload.get("type", ""))
    model = str(payload.get("model", ""))
    match kind:
        case "aliases":
            aliases = ", ".join(f"{a}=v{v}" for a, v in sorted(payload.get("aliases", {}).items()))
            summary = f"{model} aliases (epoch {payload.get('epoch')}): {aliases}"
        case "service":
            summary = f"service {payload.get('id')} {payload.get('change')}"
        case "load" | "unload":
            summary = f"{model} v{payload.get('version')} {kind}ed on {payload.get('service_id')}"
        case "alert":
            summary = f"alert {payload.get('name')} {payload.get('state')}: {payload.get('summary', '')}"
        case "canary":
            summary = f"canary {model}: {payload.get('action')}: {payload.get('reason', '')}"
        case "shadow":
            diff = payload.get("max_abs_diff")
            size = f"{diff:.3g}" if isinstance(diff, int | float) else "-"
            summary = (
                f"shadow {model} v{payload.get('version')} {payload.get('state')}: "
                f"{float(payload.get('mismatch_rate') or 0.0):.1%} of {payload.get('comparisons')} "
                f"comparisons mismatch, max |diff| {size}"
            )
        case _:
            summary = kind
    return FeedEvent(time.time(), kind, model, summary, payload)


class EventBus:
    """Publishes the monitor's events and serves watchers.

    Args:
        store: The cluster's Redis.
    """

    def __init__(self, store: CoordinationStore) -> None:
        self._store = store
        self._watchers: set[asyncio.Queue[FeedEvent]] = set()
        self._held: dict[str, set[tuple[str, int]]] | None = None

    async def publish(self, payload: dict[str, Any]) -> None:
        """Append a decision event to the Redis log and publish it on the channel."""
        payload = {"v": 1, **payload}
        data = json.dumps(payload)
        try:
            async with self._store.client.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    self._store.keys.events_log(),
                    {"event": data},
                    maxlen=_EVENTS_LOG_MAXLEN,
                    approximate=True,
                )
                pipe.publish(self._store.keys.events_channel(), data)
                await pipe.execute()
        except RedisError as exc:
            # Redis down: the watchers of this monitor still hear about it.
            log.warning("cannot publish %s event to Redis: %s", payload.get("type"), exc)
            self._fan_out(summarize(payload))

    def local(self, payload: dict[str, Any]) -> None:
        """Send an event to this monitor's watchers only."""
        self._fan_out(summarize({"v": 1, **payload}))

    def observe_membership(self, services: list[ServiceRecord]) -> None:
        """Emit load/unload events for versions that became ready or went away."""
        held = {r.id: {(v.model, v.version) for v in r.versions if v.state == "ready"} for r in services}
        if self._held is not None:
            for service_id in held.keys() | self._held.keys():
                now, before = held.get(service_id, set()), self._held.get(service_id, set())
                changes = [("load", k) for k in sorted(now - before)]
                changes += [("unload", k) for k in sorted(before - now)]
                for kind, (model, version) in changes:
                    self.local({"type": kind, "model": model, "version": version, "service_id": service_id})
        self._held = held

    def _fan_out(self, event: FeedEvent) -> None:
        for queue in self._watchers:
            if queue.qsize() < _QUEUE_LIMIT:  # a stalled watcher loses events, not memory
                queue.put_nowait(event)

    async def watch(self, model: str = "") -> AsyncIterator[FeedEvent]:
        """Events from now on: Redis channel and local ones, optionally of one model only."""
        queue: asyncio.Queue[FeedEvent] = asyncio.Queue()
        self._watchers.add(queue)
        relay = asyncio.create_task(self._relay(queue), name="watch relay")
        try:
            while True:
                event = await queue.get()
                if model and event.model and event.model != model:
                    continue
                yield event
        finally:
            self._watchers.discard(queue)
            relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)

    async def _relay(self, queue: asyncio.Queue[FeedEvent]) -> None:
        while True:
            pubsub = self._store.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._store.keys.events_channel())
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    try:
                        payload = json.loads(message["data"])
                    except (TypeError, ValueError):
                        continue
                    if isinstance(payload, dict):
                        queue.put_nowait(summarize(payload))
            except RedisError as exc:
                log.debug("event watch lost Redis: %s", exc)
                await asyncio.sleep(1.0)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves PubSub.aclose unannotated
