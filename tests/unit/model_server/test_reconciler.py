"""The reconciler against an in-memory alias source: load what aliases point at, unload the
rest after the hand-over, retry failures with backoff, react to events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from model_server.batching import BatchConfig
from model_server.reconciler import Backoff, Reconciler
from model_server.repository import ModelRepository, VersionState
from modelyard.coordination import AliasesEvent, Event
from modelyard.errors import CoordinationUnavailable
from tests.unit.model_server.model_artifacts import MemorySource, make_artifact, mlp, torchscript_bytes


class MemoryAliases:
    """Alias maps in a dict and an event queue, shaped like CoordinationStore."""

    def __init__(self) -> None:
        self.aliases: dict[str, dict[str, int]] = {}
        self.events_queue: asyncio.Queue[Event] = asyncio.Queue()
        self.down = False

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        if self.down:
            raise CoordinationUnavailable("redis is down")
        return {model: (dict(pointers), 1) for model, pointers in self.aliases.items()}

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self.events_queue.get()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for work on other threads (loads) to show; the interval is not what is tested."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not condition():
        if loop.time() > end:
            raise AssertionError("condition never held")
        await asyncio.sleep(0.005)


def state(repository: ModelRepository, model: str, version: int) -> VersionState | None:
    held = repository.get(model, version)
    return held.state if held is not None else None


Setup = tuple["MemoryAliases", ModelRepository, Reconciler, "FakeClock"]


@pytest.fixture
async def setup(source: MemorySource) -> AsyncIterator[Setup]:
    for version in (1, 2):
        source.add(make_artifact(torchscript_bytes(mlp(version)), version=version))
    aliases = MemoryAliases()
    repository = ModelRepository(source, BatchConfig(max_batch_size=4))
    clock = FakeClock()
    backoff = Backoff(base_s=10, cap_s=10, rng=lambda: 1.0)
    reconciler = Reconciler(aliases, repository, interval_s=3600, backoff=backoff, clock=clock)
    yield aliases, repository, reconciler, clock
    await reconciler.aclose()
    await repository.aclose()


async def test_moving_an_alias_loads_the_new_version_before_unloading_the_old(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 1}}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is VersionState.READY)

    source.gate = asyncio.Event()  # hold the new version's download
    aliases.aliases = {"mlp": {"production": 2}}
    await reconciler.reconcile_once()
    await eventually(lambda: ("mlp", 2) in source.fetches)
    await reconciler.reconcile_once()
    assert state(repository, "mlp", 1) is VersionState.READY, "unloaded before its successor was ready"

    source.gate.set()
    await eventually(lambda: state(repository, "mlp", 2) is VersionState.READY)
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is None)


async def test_every_aliased_version_is_held_once(source: MemorySource, setup: Setup) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 1, "canary": 2, "stable": 1}}
    await reconciler.reconcile_once()
    await reconciler.reconcile_once()
    await eventually(lambda: all(state(repository, "mlp", v) is VersionState.READY for v in (1, 2)))
    assert sorted(source.fetches) == [("mlp", 1), ("mlp", 2)]


async def test_a_failed_load_is_reported_and_retried_after_backoff(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, clock = setup
    aliases.aliases = {"mlp": {"production": 3}}  # not in the source yet
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 3) is VersionState.FAILED)
    failed = repository.get("mlp", 3)
    assert failed is not None and "no mlp v3" in failed.record().error
    await eventually(lambda: not reconciler._loading)  # noqa: SLF001 - the failure is recorded

    await reconciler.reconcile_once()
    assert source.fetches == [("mlp", 3)], "retried before the backoff elapsed"

    source.add(make_artifact(torchscript_bytes(mlp()), version=3))
    clock.now += 10
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 3) is VersionState.READY)


async def test_a_version_nothing_points_at_is_unloaded_even_when_failed(setup: Setup) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 9}}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 9) is VersionState.FAILED)
    await eventually(lambda: not reconciler._loading)  # noqa: SLF001
    aliases.aliases = {}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 9) is None)


async def test_an_alias_event_wakes_the_reconciler_and_redis_outages_keep_what_is_loaded(
    setup: Setup,
) -> None:
    aliases, repository, reconciler, _ = setup
    run = asyncio.create_task(reconciler.run())
    watch = asyncio.create_task(reconciler.watch_events())
    try:
        aliases.aliases = {"mlp": {"production": 1}}
        aliases.events_queue.put_nowait(AliasesEvent(model="mlp", epoch=2, aliases={"production": 1}))
        await eventually(lambda: state(repository, "mlp", 1) is VersionState.READY)

        aliases.down = True
        aliases.events_queue.put_nowait(AliasesEvent(model="mlp", epoch=3, aliases={}))
        await eventually(lambda: aliases.events_queue.empty())
        for _ in range(50):
            await asyncio.sleep(0)
        assert state(repository, "mlp", 1) is VersionState.READY
    finally:
        run.cancel()
        watch.cancel()
        await asyncio.gather(run, watch, return_exceptions=True)


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(base_s=1, cap_s=8, rng=lambda: 1.0)
    assert [backoff.delay_s(n) for n in range(1, 6)] == [1, 2, 4, 8, 8]
    assert Backoff(base_s=1, cap_s=8, rng=lambda: 0.0).delay_s(3) == 2
