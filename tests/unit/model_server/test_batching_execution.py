"""Where the Batcher runs its forwards (`execution`: thread, loop, auto), preferred batch
sizes, and the warm-up sizes of a version. Loop execution computes on the event loop, so its
tests use no gates: requests submitted in one turn of the loop are known to share a batch."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from model_server import batching
from model_server.batching import LOOP_MAX_FORWARD_S, BatchConfig, Batcher
from model_server.repository import warm_up_sizes
from modelyard.errors import DeadlineExceeded, Draining, ModelFailedOnInput
from tests.unit.model_server.model_artifacts import until
from tests.unit.model_server.test_batching import GatedModel, occupy, rows


class Recorder:
    """`x * 2`, recording each forward's input shapes and the thread it ran on."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []
        self.threads: set[str] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import threading

        self.calls.append(tuple(x.shape))
        self.threads.add(threading.current_thread().name)
        if bool((x == 666).any()):
            raise RuntimeError("boom")
        return x * 2


@pytest.fixture
async def closing() -> Any:
    batchers: list[Batcher] = []
    yield batchers.append
    for batcher in batchers:
        await batcher.aclose()


def make(model: Any, closing: Any, *, device: str = "cpu", **config: Any) -> Batcher:
    batcher = Batcher(model, BatchConfig(**config), model_name="exec", version=1, device=device)
    closing(batcher)
    return batcher


# -- loop execution ---------------------------------------------------------------------------


async def test_loop_execution_batches_a_burst_and_splits_it_back_exactly(closing: Any) -> None:
    model = Recorder()
    batcher = make(model, closing, execution="loop", max_batch_size=64)
    assert batcher.execution == "loop"
    inputs = [rows(100, 1), rows(200, 3), rows(300, 2), rows(400, 1, width=8)]
    results = await asyncio.gather(*(batcher.submit([x]) for x in inputs))

    for x, (outputs, _) in zip(inputs, results, strict=True):
        assert torch.equal(outputs[0], x * 2)
    # One forward for the three width-4 requests (6 items), one for the width-8 one.
    assert sorted(model.calls) == [(1, 8), (6, 4)]
    assert results[0][1].batch_size == 6
    assert model.threads == {"MainThread"}


async def test_loop_execution_respects_max_batch_size(closing: Any) -> None:
    model = Recorder()
    batcher = make(model, closing, execution="loop", max_batch_size=4)
    counts = [1, 1, 1, 1, 1, 3, 6, 1]
    inputs = [rows(100 * i, n) for i, n in enumerate(counts)]
    results = await asyncio.gather(*(batcher.submit([x]) for x in inputs))
    for x, (outputs, _) in zip(inputs, results, strict=True):
        assert torch.equal(outputs[0], x * 2)
    assert [call[0] for call in model.calls] == [4, 4, 6, 1]


async def test_loop_execution_keeps_collecting_while_requests_keep_coming(closing: Any) -> None:
    model = Recorder()
    batcher = make(model, closing, execution="loop", max_batch_size=64, max_queue_delay_s=60)

    async def later(turns: int, x: torch.Tensor) -> Any:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await batcher.submit([x])

    # A request arrives on each of the first turns of the loop: they all share one batch.
    inputs = [rows(10 * i, 1) for i in range(4)]
    await asyncio.gather(*(later(i, x) for i, x in enumerate(inputs)))
    assert model.calls == [(4, 4)]


async def test_a_lone_request_on_the_loop_does_not_wait_out_the_window(closing: Any) -> None:
    batcher = make(Recorder(), closing, execution="loop", max_queue_delay_s=3600)
    outputs, timing = await asyncio.wait_for(batcher.submit([rows(0, 1)]), timeout=10)
    assert torch.equal(outputs[0], rows(0, 1) * 2)
    assert timing.batch_size == 1


async def test_loop_execution_failing_batch_fails_only_the_request_at_fault(closing: Any) -> None:
    model = Recorder()
    batcher = make(model, closing, execution="loop")
    bad, neighbour, other_shape = await asyncio.gather(
        batcher.submit([rows(666, 1)]),
        batcher.submit([rows(1, 2)]),
        batcher.submit([rows(1, 2, width=8)]),
        return_exceptions=True,
    )
    assert isinstance(bad, ModelFailedOnInput)
    assert torch.equal(neighbour[0][0], rows(1, 2) * 2)  # type: ignore[index]
    assert torch.equal(other_shape[0][0], rows(1, 2, width=8) * 2)  # type: ignore[index]
    outputs, _ = await batcher.submit([rows(7, 3)])
    assert torch.equal(outputs[0], rows(7, 3) * 2)
    assert batcher.outstanding == 0


async def test_loop_execution_drops_expired_and_cancelled_requests_before_compute(closing: Any) -> None:
    model = Recorder()
    batcher = make(model, closing, execution="loop")
    loop = asyncio.get_running_loop()
    expired = asyncio.create_task(batcher.submit([rows(500, 2)], deadline=loop.time() - 0.001))
    cancelled = asyncio.create_task(batcher.submit([rows(0, 5)]))
    alive = asyncio.create_task(batcher.submit([rows(600, 1)], deadline=loop.time() + 60))
    await until(lambda: batcher.queued_items == 8)
    cancelled.cancel()

    with pytest.raises(DeadlineExceeded):
        await expired
    outputs, _ = await alive
    assert torch.equal(outputs[0], rows(600, 1) * 2)
    assert cancelled.cancelled()
    assert model.calls == [(1, 4)]  # neither the expired nor the cancelled rows were computed


async def test_loop_execution_aclose_finishes_what_was_accepted(closing: Any) -> None:
    model = Recorder()
    batcher = make(model, closing, execution="loop", max_queue_delay_s=60)
    queued = [asyncio.create_task(batcher.submit([rows(10 * i, 1)])) for i in range(3)]
    await until(lambda: batcher.queued_items == 3)
    await batcher.aclose()
    with pytest.raises(Draining):
        await batcher.submit([rows(0, 1)])
    for i, task in enumerate(queued):
        outputs, _ = await task
        assert torch.equal(outputs[0], rows(10 * i, 1) * 2)


def test_loop_execution_needs_one_instance() -> None:
    with pytest.raises(ValueError, match="instances must be 1"):
        BatchConfig(execution="loop", instances=2)
    with pytest.raises(ValueError, match="not one of"):
        BatchConfig(execution="gpu")


# -- auto -------------------------------------------------------------------------------------


async def test_auto_runs_a_fast_cpu_forward_on_the_loop(
    closing: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound no `x * 2` misses, however busy the machine running the test.
    monkeypatch.setattr(batching, "LOOP_MAX_FORWARD_S", 1.0)
    model = Recorder()
    batcher = make(model, closing, max_batch_size=8)
    assert batcher.execution == "thread"  # until warm-up has timed the forward
    await batcher.warm_up([rows(0, 8)])
    assert 0 < batcher.warm_up_s[8] <= 1.0
    assert batcher.settle_execution() == "loop"
    model.threads.clear()
    await batcher.submit([rows(0, 2)])
    assert model.threads == {"MainThread"}


@pytest.mark.parametrize(
    ("device", "config"),
    [
        pytest.param("cpu", {"execution": "thread"}, id="asked-for-threads"),
        pytest.param("cpu", {"instances": 2}, id="several-instances"),
        pytest.param("cuda:0", {}, id="gpu"),
    ],
)
async def test_auto_keeps_threads_where_the_loop_would_not_pay(
    closing: Any, device: str, config: dict[str, Any]
) -> None:
    batcher = make(Recorder(), closing, device=device, max_batch_size=8, **config)
    await batcher.warm_up([rows(0, 8)])
    assert batcher.settle_execution() == "thread"


async def test_auto_keeps_a_slow_forward_off_the_loop(closing: Any) -> None:
    def slow(x: torch.Tensor) -> torch.Tensor:
        time.sleep(LOOP_MAX_FORWARD_S * 3)
        return x

    batcher = make(slow, closing, max_batch_size=8)
    await batcher.warm_up([rows(0, 8)], repeats=1)
    assert batcher.settle_execution() == "thread"


async def test_auto_times_again_a_forward_that_a_busy_machine_slowed_at_load(
    closing: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bound of 50 ms no `x * 2` misses; the warm-up's three forwards are slowed to twice
    # it, as a machine busy starting a cluster slows them, and then the model runs at its cost.
    monkeypatch.setattr(batching, "LOOP_MAX_FORWARD_S", 0.05)
    calls = 0

    def busy_then_fast(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls <= 3:
            time.sleep(0.1)
        return x * 2

    batcher = make(busy_then_fast, closing, max_batch_size=8)
    await batcher.warm_up([rows(0, 8)])
    assert batcher.warm_up_s[8] > 0.05
    await batcher.retime([rows(0, 8)])
    assert calls == 4 and batcher.warm_up_s[8] <= 0.05  # one more was enough
    assert batcher.settle_execution() == "loop"


async def test_auto_does_not_time_again_a_forward_well_over_the_bound(
    closing: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batching, "LOOP_MAX_FORWARD_S", 0.01)
    calls = 0

    def slow(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        time.sleep(0.01 * (batching.RETIME_FACTOR + 1))
        return x

    batcher = make(slow, closing, max_batch_size=8)
    await batcher.warm_up([rows(0, 8)])
    await batcher.retime([rows(0, 8)])
    assert calls == 3
    assert batcher.settle_execution() == "thread"


# -- preferred batch sizes --------------------------------------------------------------------


async def test_a_group_that_fills_a_preferred_size_leaves_without_waiting(closing: Any) -> None:
    model = GatedModel()
    batcher = make(
        model,
        closing,
        execution="thread",
        max_batch_size=8,
        max_queue_delay_s=3600,
        instances=2,
        preferred_batch_sizes=(2, 4),
    )
    first = await occupy(batcher, model)
    # A batch is in flight and the window is an hour, but 2 is a preferred size: it leaves.
    outputs = await asyncio.wait_for(
        asyncio.gather(batcher.submit([rows(1, 1)]), batcher.submit([rows(2, 1)])), timeout=10
    )
    assert [timing.batch_size for _, timing in outputs] == [2, 2]
    model.release()
    await first


async def test_batches_take_the_largest_preferred_size_they_can_fill(closing: Any) -> None:
    model = GatedModel()
    batcher = make(
        model,
        closing,
        execution="thread",
        max_batch_size=8,
        max_queue_delay_s=3600,
        preferred_batch_sizes=(4,),
    )
    first = await occupy(batcher, model)
    tasks = [asyncio.create_task(batcher.submit([rows(10 * i, 1)])) for i in range(5)]
    await until(lambda: batcher.queued_items == 5)
    model.release()
    results = await asyncio.gather(*tasks)
    await first
    for i, (outputs, _) in enumerate(results):
        assert torch.equal(outputs[0], rows(10 * i, 1) * 2)
    # 5 waiting: a batch of 4 (preferred), then the last one once the server is idle again.
    assert [call[0][0] for call in model.calls] == [1, 4, 1]


def test_preferred_sizes_are_checked_and_normalised() -> None:
    assert BatchConfig(max_batch_size=8, preferred_batch_sizes=(8, 2, 2)).preferred_batch_sizes == (2, 8)
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        BatchConfig(max_batch_size=8, preferred_batch_sizes=(16,))


# -- warm-up sizes ----------------------------------------------------------------------------


def test_warm_up_covers_every_size_a_batch_can_take() -> None:
    sweep, settle = warm_up_sizes(BatchConfig(max_batch_size=8, preferred_batch_sizes=(4,)))
    assert settle == [1, 4, 8]
    assert sorted(sweep + settle) == list(range(1, 9))


def test_warm_up_of_large_batches_goes_by_powers_of_two_beyond_64() -> None:
    sweep, settle = warm_up_sizes(BatchConfig(max_batch_size=512))
    assert settle == [1, 512]
    assert sweep == [*range(2, 65), 128, 256]
