"""The reconciler against an in-memory alias source: load what aliases point at, unload the
rest after the hand-over, retry failures with backoff, react to events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import torch

from model_server.batching import BatchConfig
from model_server.placement import owners
from model_server.reconciler import Backoff, Reconciler
from model_server.repository import ModelRepository, VersionState
from modelyard.coordination import AliasesEvent, Deployment, Event, ServiceRecord, VersionRecord
from modelyard.errors import CoordinationUnavailable
from tests.unit.model_server.model_artifacts import (
    MemorySource,
    infer_torch,
    make_artifact,
    mlp,
    torchscript_bytes,
)


class MemoryAliases:
    """Alias maps in a dict and an event queue, shaped like CoordinationStore."""

    def __init__(self) -> None:
        self.aliases: dict[str, dict[str, int]] = {}
        self.deployments: dict[str, Deployment] = {}
        self.servers: list[str] = []
        self.ready: dict[str, list[tuple[str, int]]] = {}
        self.events_queue: asyncio.Queue[Event] = asyncio.Queue()
        self.down = False

    async def all_aliases(self) -> dict[str, tuple[dict[str, int], int]]:
        if self.down:
            raise CoordinationUnavailable("redis is down")
        return {model: (dict(pointers), 1) for model, pointers in self.aliases.items()}

    async def all_deployments(self) -> dict[str, Deployment]:
        return dict(self.deployments)

    async def list_services(self) -> list[ServiceRecord]:
        return [
            ServiceRecord(
                id=i,
                kind="model_server",
                address="",
                versions=[VersionRecord(model=m, version=v, state="ready") for m, v in self.ready.get(i, [])],
            )
            for i in self.servers
        ]

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
    aliases, repository, reconciler, clock = setup
    aliases.aliases = {"mlp": {"production": 9}}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 9) is VersionState.FAILED)
    await eventually(lambda: not reconciler._loading)  # noqa: SLF001
    aliases.aliases = {}
    await reconciler.reconcile_once()
    # The whole model vanished: that may be a Redis that lost its data, so wait a grace.
    assert state(repository, "mlp", 9) is VersionState.FAILED
    clock.now += 10
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 9) is None)


async def test_a_redis_that_lost_its_data_unloads_nothing_until_repaired(setup: Setup) -> None:
    aliases, repository, reconciler, clock = setup
    aliases.aliases = {"mlp": {"production": 1}}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is VersionState.READY)
    aliases.aliases = {}  # a failover to an empty replica, a FLUSHALL...
    for _ in range(3):
        clock.now += 3
        await reconciler.reconcile_once()
    aliases.aliases = {"mlp": {"production": 1}}  # the registry re-pushed it
    clock.now += 3
    await reconciler.reconcile_once()
    aliases.aliases = {}
    clock.now += 9
    await reconciler.reconcile_once()  # the grace restarts after a repair
    assert state(repository, "mlp", 1) is VersionState.READY


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


# -- deployments ----------------------------------------------------------------------------


async def test_placed_versions_are_loaded_side_by_side_and_the_rest_unloaded(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 2}}
    aliases.deployments = {"mlp": Deployment(placed_versions=[1, 2])}
    await reconciler.reconcile_once()
    await eventually(lambda: all(state(repository, "mlp", v) is VersionState.READY for v in (1, 2)))
    aliases.deployments = {"mlp": Deployment(placed_versions=[2])}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is None)
    assert state(repository, "mlp", 2) is VersionState.READY


async def test_only_the_versions_rendezvous_gives_this_server_are_loaded(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.servers = ["other-1", "other-2", "other-3"]
    aliases.deployments = {"mlp": Deployment(placed_versions=[1, 2], replicas=1)}
    await reconciler.reconcile_once()
    # The fixture's reconciler has server id "": rendezvous decides, and it is exactly that.
    mine = {v for v in (1, 2) if "" in owners("mlp", v, ["", *aliases.servers], 1)}
    assert {k[1] for k in reconciler.desired} == mine
    await eventually(lambda: all(state(repository, "mlp", v) is VersionState.READY for v in mine))
    assert all(state(repository, "mlp", v) is None for v in {1, 2} - mine)


async def test_a_settings_change_reloads_the_version_and_fails_no_request(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 1}}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is VersionState.READY)
    first = repository.get("mlp", 1)
    assert first is not None and first.serving.batch.max_batch_size == 4

    stop = asyncio.Event()
    served = 0

    async def caller() -> None:
        nonlocal served
        while not stop.is_set():
            await infer_torch(repository, "mlp", 1, [("input", torch.randn(2, 4))])
            served += 1

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    aliases.deployments = {"mlp": Deployment(max_batch_size=2, max_queue_delay_ms=0.5)}
    await reconciler.reconcile_once()
    await eventually(lambda: (v := repository.get("mlp", 1)) is not None and v is not first)
    second = repository.get("mlp", 1)
    assert second is not None and second.state is VersionState.READY
    assert second.serving.batch.max_batch_size == 2
    # The old copy finishes what it accepted, then is dropped.
    await eventually(lambda: first.batcher is None and first.module is None)
    await reconciler.reconcile_once()
    assert repository.get("mlp", 1) is second, "reloaded again without a change"
    before = served
    await eventually(lambda: served > before + 8)
    stop.set()
    await asyncio.gather(*callers)  # any failed request raises here


async def test_a_device_this_server_lacks_fails_the_load_with_the_reason(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 1}}
    wanted = "cuda:7" if not torch.cuda.is_available() else "tpu"
    aliases.deployments = {"mlp": Deployment(device=wanted)}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is VersionState.FAILED)
    failed = repository.get("mlp", 1)
    assert failed is not None and wanted in failed.error


async def test_bf16_on_cpu_serves_close_to_fp32(source: MemorySource, setup: Setup) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.aliases = {"mlp": {"production": 1}}
    aliases.deployments = {"mlp": Deployment(precision="bf16")}
    await reconciler.reconcile_once()
    await eventually(lambda: state(repository, "mlp", 1) is VersionState.READY)
    x = torch.randn(3, 4)
    (output,), _ = await infer_torch(repository, "mlp", 1, [("input", x)])
    assert output.dtype == torch.float32
    with torch.inference_mode():
        expected = mlp(1)(x)
    torch.testing.assert_close(output, expected, rtol=0.05, atol=0.05)


async def test_a_version_moving_to_a_new_server_stays_here_until_it_is_ready_there(
    source: MemorySource, setup: Setup
) -> None:
    aliases, repository, reconciler, _ = setup
    aliases.deployments = {"mlp": Deployment(placed_versions=[1, 2], replicas=1)}
    await reconciler.reconcile_once()  # alone: both versions are ours
    await eventually(lambda: all(state(repository, "mlp", v) is VersionState.READY for v in (1, 2)))

    aliases.servers = [f"other-{i}" for i in range(8)]
    await reconciler.reconcile_once()
    moved = {v for v in (1, 2) if "" not in owners("mlp", v, ["", *aliases.servers], 1)}
    assert moved, "with 9 servers and 1 replica, some version should move (fixed hashing)"
    await reconciler.reconcile_once()
    assert all(state(repository, "mlp", v) is VersionState.READY for v in moved), "gap in serving"

    for v in moved:
        (owner,) = owners("mlp", v, aliases.servers, 1)
        aliases.ready.setdefault(owner, []).append(("mlp", v))
    await reconciler.reconcile_once()
    await eventually(lambda: all(state(repository, "mlp", v) is None for v in moved))
