"""Keeps what a model server holds equal to what the aliases in Redis point at.

Desired = every (model, version) some alias points at. On start, every `interval_s`, and at
once on an alias event, the reconciler loads what is missing (concurrently, one load per
version) and unloads what nothing points at any more. A failed load stays visible as
"failed" (with its error, in the heartbeat) and is retried with exponential backoff.

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

from model_server.repository import ModelRepository, VersionState
from modelyard.coordination import AliasesEvent, Event
from modelyard.errors import CoordinationUnavailable
from modelyard.tasks import cancel_task

__all__ = ["AliasSource", "Backoff", "Reconciler"]

log = logging.getLogger(__name__)

VersionKey = tuple[str, int]


class AliasSource(Protocol):
    """The part of `CoordinationStore` the reconciler reads."""

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]: ...

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
    """

    def __init__(
        self,
        store: AliasSource,
        repository: ModelRepository,
        *,
        interval_s: float,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
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
        self.desired: frozenset[VersionKey] = frozenset()
        """What the aliases pointed at in the last successful read."""

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
            if isinstance(event, AliasesEvent):
                self._wake.set()

    async def reconcile_once(self) -> None:
        """One comparison of desired and held versions; starts loads and unloads, returns
        without waiting for them."""
        aliases = await self._store.all_aliases()
        desired = frozenset(
            (model, version) for model, (pointers, _epoch) in aliases.items() for version in pointers.values()
        )
        self.desired = desired
        now = self._clock()
        for key in sorted(desired):
            if key in self._loading or key in self._unloading:
                continue
            held = self._repository.get(*key)
            if held is not None and held.state in (VersionState.READY, VersionState.LOADING):
                continue
            if now < self._retry_at.get(key, 0.0):
                continue
            self._spawn(self._loading, key, self._load(key))

        self._deferred_unloads = False
        for key in sorted(self._repository.keys()):
            if key in desired or key in self._unloading:
                continue
            if self._model_still_loading(key[0], desired):
                self._deferred_unloads = True
                continue
            self._failures.pop(key, None)
            self._retry_at.pop(key, None)
            self._spawn(self._unloading, key, self._unload(key))

    def _model_still_loading(self, model: str, desired: frozenset[VersionKey]) -> bool:
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

    async def _load(self, key: VersionKey) -> None:
        model, version = key
        try:
            await self._repository.load(model, version)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return  # the load itself was cancelled by an unload: nothing to retry
        except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
            failures = self._failures[key] = self._failures.get(key, 0) + 1
            delay_s = self._backoff.delay_s(failures)
            self._retry_at[key] = self._clock() + delay_s
            log.warning("loading %s v%d failed (%d in a row); retrying in %.1fs: %s",
                        model, version, failures, delay_s, exc)
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
