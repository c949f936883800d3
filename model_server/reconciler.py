"""Keeps what a model server holds equal to what the deployments in Redis place on it.

Desired = the versions `model_server.placement.desired_versions` gives this server: each
model's `placed_versions` (fallback: every aliased version), on `replicas` servers chosen by
rendezvous hashing over the live model servers, served with the deployment's device,
precision and batching over this server's defaults. On start, every `interval_s`, and at
once on an alias event or a model server joining or leaving, the reconciler loads what is
missing (concurrently, one load per version), reloads a version whose serving settings
changed (the old copy serves until the new one is warm), and unloads what nothing places
here any more. A failed load stays visible as "failed" (with its error, in the heartbeat)
and is retried with exponential backoff. A version whose deployment cannot be served here
(`placement.ServingError`, e.g. a preferred batch size above this server's max_batch_size)
is not loaded: it shows as failed with the reason in the heartbeat, and the check is retried
with the same backoff (a copy already serving here keeps serving, with the reason as its
error); other models are unaffected.

Hand-over: a version no longer wanted is unloaded only once no other version of the same
model is still loading here, so moving an alias never leaves the model with nothing ready on
this server. While Redis is unreachable, what is loaded stays loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

from model_server.devices import ServingConfig
from model_server.placement import ServingError, desired_versions, owners, placed_versions
from model_server.repository import ModelRepository, VersionState
from modelyard.coordination import AliasesEvent, Deployment, Event, ServiceEvent, ServiceRecord
from modelyard.errors import CoordinationUnavailable
from modelyard.tasks import cancel_task

__all__ = ["AliasSource", "Backoff", "Reconciler"]

log = logging.getLogger(__name__)

VersionKey = tuple[str, int]


class AliasSource(Protocol):
    """The part of `CoordinationStore` the reconciler reads."""

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]: ...

    async def all_deployments(self) -> dict[str, Deployment]: ...

    async def list_services(self) -> list[ServiceRecord]: ...

    def events(self) -> AsyncIterator[Event]: ...


class Backoff:
    """Exponential backoff with jitter: about `base_s * 2**(failures-1)`, at most `cap_s`,
    scaled by a random factor in [0.5, 1) so that servers do not retry in step."""

    def __init__(
        self, *, base_s: float = 1.0, cap_s: float = 60.0, rng: Callable[[], float] = random.random
    ) -> None:
        self._base_s = base_s
        self._cap_s = cap_s
        self._rng = rng

    def delay_s(self, failures: int) -> float:
        """How long to wait after the `failures`-th failure in a row (1 or more)."""
        exponent = min(failures - 1, 30)
        return min(self._cap_s, self._base_s * 2.0**exponent) * (0.5 + 0.5 * self._rng())


class Reconciler:
    """Loads and unloads versions so the repository follows the aliases.

    `run()` and `watch_events()` are long-running loops; their owner (the app) spawns them
    and cancels them, then calls `aclose()` to cancel loads and unloads in progress.

    Args:
        store: Where aliases and their change events come from.
        repository: What this server holds.
        interval_s: Time between full reconciliations when no event arrives.
        backoff: Wait before retrying a failed load.
        clock: Monotonic seconds (tests pass their own).
        server_id: This server's id in the membership (for placement).
        absent_model_grace_s: How long a model must be missing from Redis altogether (no
            aliases, no deployment) before its versions are unloaded. A Redis that lost its
            data (a flush, a failover to a replica that was not in sync) looks exactly like
            that until the registry re-pushes it, which takes a few seconds; a model really
            deleted can wait that long.
    """

    def __init__(
        self,
        store: AliasSource,
        repository: ModelRepository,
        *,
        interval_s: float,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        server_id: str = "",
        absent_model_grace_s: float = 10.0,
    ) -> None:
        self._store = store
        self._server_id = server_id
        self._absent_model_grace_s = absent_model_grace_s
        self._absent_since: dict[str, float] = {}
        self._repository = repository
        self._interval_s = interval_s
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._wake = asyncio.Event()
        self._loading: dict[VersionKey, asyncio.Task[None]] = {}
        self._unloading: dict[VersionKey, asyncio.Task[None]] = {}
        self._failures: dict[VersionKey, int] = {}
        self._retry_at: dict[VersionKey, float] = {}
        self._deferred_unloads = False
        self._closed = False
        self._loading_config: dict[VersionKey, ServingConfig | ServingError] = {}
        self._placed: dict[VersionKey, int] = {}
        self._ready_elsewhere: set[tuple[str, int, str]] = set()
        self._live: list[str] = []
        self.desired: dict[VersionKey, ServingConfig | ServingError] = {}
        """What was placed here in the last successful read, with its serving settings (or
        why its deployment cannot be served here)."""

    def wake(self) -> None:
        """Reconcile now (something changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Reconcile at start, then every `interval_s` or when woken, until cancelled."""
        while True:
            self._wake.clear()
            try:
                await self.reconcile_once()
            except CoordinationUnavailable as exc:
                log.warning("cannot read aliases; keeping what is loaded: %s", exc)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can turn a cancellation that
            # lands as its timeout fires into a TimeoutError, and this loop would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()

    async def watch_events(self) -> None:
        """Wake the reconciler on every alias event, until cancelled. Raises when the
        subscription drops (its owner restarts it)."""
        # Events may have been missed while (re)subscribing; resync.
        self._wake.set()
        async for event in self._store.events():
            # Placement depends on the membership too: a model server joining or leaving
            # moves the versions it wins or held.
            if isinstance(event, AliasesEvent) or (
                isinstance(event, ServiceEvent) and event.change in ("up", "down")
            ):
                self._wake.set()

    async def reconcile_once(self) -> None:
        """One comparison of desired and held versions; starts loads and unloads, returns
        without waiting for them."""
        aliases = await self._store.all_aliases()
        deployments = await self._store.all_deployments()
        services = await self._store.list_services()
        live = [s.id for s in services if s.kind == "model_server" and not s.draining]
        desired = desired_versions(
            aliases,
            deployments,
            server_id=self._server_id,
            live_servers=live,
            defaults=self._repository.default_serving,
        )
        self.desired = desired
        self._placed = placed_versions(aliases, deployments)
        self._ready_elsewhere = {
            (v.model, v.version, s.id)
            for s in services
            if s.kind == "model_server" and not s.draining and s.id != self._server_id
            for v in s.versions
            if v.state == "ready"
        }
        self._live = [s for s in live if s != self._server_id]
        now = self._clock()
        for key in sorted(desired):
            serving = desired[key]
            if key in self._unloading:
                continue
            if key in self._loading and self._loading_config.get(key) == serving:
                continue
            held = self._repository.get(*key)
            if key not in self._loading and held is not None:
                if held.state is VersionState.LOADING:
                    continue
                if held.state is VersionState.READY and held.serving == serving:
                    continue
            if now < self._retry_at.get(key, 0.0) and self._loading_config.get(key) == serving:
                continue
            self._loading_config[key] = serving
            self._spawn(self._loading, key, self._load(key, serving))

        self._deferred_unloads = False
        present = {*aliases, *deployments}
        self._absent_since = {
            m: self._absent_since.get(m, now) for m, _ in self._repository.keys() if m not in present
        }
        for key in sorted(self._repository.keys()):
            if key in desired or key in self._unloading:
                continue
            absent_since = self._absent_since.get(key[0])
            if absent_since is not None and now - absent_since < self._absent_model_grace_s:
                # The whole model vanished from Redis: wait for the registry's repair.
                self._deferred_unloads = True
                continue
            if self._model_still_loading(key[0], desired) or self._not_yet_handed_over(key):
                self._deferred_unloads = True
                continue
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)
            self._loading_config.pop(key, None)
            log.info(
                "unloading %s v%d: %s",
                key[0],
                key[1],
                "placed on other servers"
                if key in self._placed
                else f"no longer placed (aliases {aliases.get(key[0], ({}, 0))[0]}, deployment "
                f"{deployments[key[0]].placed_versions if key[0] in deployments else None})",
            )
            self._spawn(self._unloading, key, self._unload(key))

    def _not_yet_handed_over(self, key: VersionKey) -> bool:
        """True while a version still placed in the cluster but moved off this server (a
        server joined, or `replicas` changed) is not yet ready on its new owners: keep
        serving it here until they report it ready, so the move leaves no gap."""
        replicas = self._placed.get(key)
        if replicas is None:
            return False  # placed nowhere any more
        model, version = key
        new_owners = owners(model, version, self._live, replicas)
        return not all((model, version, owner) in self._ready_elsewhere for owner in new_owners)

    def _model_still_loading(
        self, model: str, desired: dict[VersionKey, ServingConfig | ServingError]
    ) -> bool:
        for other in desired:
            if other[0] != model:
                continue
            held = self._repository.get(*other)
            # The repository's state decides; a load task not yet started counts as loading.
            if held is None and other in self._loading:
                return True
            if held is not None and held.state is VersionState.LOADING:
                return True
        return False

    def _spawn(
        self,
        tasks: dict[VersionKey, asyncio.Task[None]],
        key: VersionKey,
        coroutine: Coroutine[Any, Any, None],
    ) -> None:
        if self._closed:
            coroutine.close()
            return
        task = asyncio.create_task(coroutine, name=f"reconcile {key[0]} v{key[1]}")
        tasks[key] = task

        def done(finished: asyncio.Task[None]) -> None:
            if tasks.get(key) is finished:
                del tasks[key]
            if not finished.cancelled() and (exc := finished.exception()) is not None:
                log.error("reconciling %s v%d crashed", key[0], key[1], exc_info=exc)

        task.add_done_callback(done)

    async def _load(self, key: VersionKey, serving: ServingConfig | ServingError) -> None:
        model, version = key
        try:
            if isinstance(serving, ServingError):
                # Fails like any load (logged, retried with backoff): the deployment may be
                # fixed meanwhile, and a copy already serving here keeps serving. The heartbeat
                # shows the version FAILED with the reason.
                self._repository.fail(model, version, serving.message)
                raise serving.error()
            await self._repository.load(model, version, serving)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return  # the load itself was cancelled by an unload: nothing to retry
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay_s = self._backoff.delay_s(failures)
            self._retry_at[key] = self._clock() + delay_s
            log.warning(
                "loading %s v%d failed (%d in a row); retrying in %.1fs: %s",
                model,
                version,
                failures,
                delay_s,
                exc,
            )
        else:
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)
        if self._deferred_unloads:
            self._wake.set()

    async def _unload(self, key: VersionKey) -> None:
        await self._repository.unload(*key)
        # It may be wanted again already (an alias moved back while it drained).
        self._wake.set()

    async def aclose(self) -> None:
        """Cancel every load and unload in progress."""
        self._closed = True
        for task in [*self._loading.values(), *self._unloading.values()]:
            await cancel_task(task)
