"""The Batcher on plain torch functions: exact split-back, grouping, bounds, drops, failures,
drain, and the dispatch rule. Timing is driven by gates, not sleeps: a gated model blocks its
worker thread until released, and tells the loop when it has entered."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY

from model_server.batching import BATCH_SIZE, ISOLATIONS, QUEUE_DEPTH, BatchConfig, Batcher
from modelyard.errors import (
    DeadlineExceeded,
    Draining,
    InvalidArgument,
    ModelExecutionError,
    ModelFailedOnInput,
    QueueFull,
)
from tests.unit.model_server.model_artifacts import until

BLOCK = -1.0
"""A request whose first element is BLOCK holds its batch's worker until the gate opens."""


class GatedModel:
    """`fn(*inputs)`, recording each call's input shapes; a batch that holds a BLOCK row waits
    for `release()` on its worker thread."""

    def __init__(self, fn: Callable[..., Any] = lambda x: x * 2) -> None:
        self.fn = fn
        self.calls: list[list[tuple[int, ...]]] = []
        self.entered = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._gate = threading.Event()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        self.calls.append([tuple(t.shape) for t in inputs])
        if inputs[0].numel() and bool((inputs[0].reshape(inputs[0].shape[0], -1)[:, 0] == BLOCK).any()):
            self._loop.call_soon_threadsafe(self.entered.set)
            assert self._gate.wait(timeout=30), "the test never released the gate"
        return self.fn(*inputs)

    def release(self) -> None:
        self._gate.set()


def rows(start: float, items: int, width: int = 4) -> torch.Tensor:
    """`items` distinguishable rows: row i is filled with start + i."""
    return (torch.arange(items, dtype=torch.float32) + start).unsqueeze(1).repeat(1, width)


def blocker(width: int = 4) -> torch.Tensor:
    return torch.full((1, width), BLOCK)


async def occupy(batcher: Batcher, model: GatedModel, width: int = 4) -> asyncio.Task[Any]:
    """Start a blocking request and wait until it holds a worker."""
    task = asyncio.create_task(batcher.submit([blocker(width)]))
    await model.entered.wait()
    return task


@pytest.fixture
async def closing() -> Any:
    """Collects batchers and closes them after the test."""
    batchers: list[Batcher] = []
    yield batchers.append
    for batcher in batchers:
        await batcher.aclose()


def make(model: Any, closing: Any, **config: Any) -> Batcher:
    batcher = Batcher(model, BatchConfig(**config), model_name="unit", version=1)
    closing(batcher)
    return batcher


async def test_mixed_item_counts_are_concatenated_and_split_back_exactly(closing: Any) -> None:
    model = GatedModel(lambda x: (x * 2, x.sum(dim=1)))
    batcher = make(model, closing, max_batch_size=64, max_queue_delay_s=60)
    first = await occupy(batcher, model)
    inputs = [rows(100, 1), rows(200, 3), rows(300, 2)]
    tasks = [asyncio.create_task(batcher.submit([x])) for x in inputs]
    await until(lambda: batcher.queued_items == 6)
    model.release()

    results = await asyncio.gather(*tasks)
    await first
    for x, (outputs, timing) in zip(inputs, results, strict=True):
        doubled, summed = outputs
        assert torch.equal(doubled, x * 2)
        assert torch.equal(summed, x.sum(dim=1))
        assert timing.batch_size == 6
        assert timing.queue_s >= 0 and timing.compute_s >= 0
    assert model.calls == [[(1, 4)], [(6, 4)]]


async def test_requests_of_different_shapes_are_never_mixed(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64, max_queue_delay_s=60)
    first = await occupy(batcher, model)
    inputs = [rows(10, 1, width=4), rows(20, 1, width=8), rows(30, 2, width=4)]
    tasks = [asyncio.create_task(batcher.submit([x])) for x in inputs]
    await until(lambda: batcher.queued_items == 4)
    model.release()

    results = await asyncio.gather(*tasks)
    await first
    for x, (outputs, _) in zip(inputs, results, strict=True):
        assert torch.equal(outputs[0], x * 2)
    # Two groups, two forwards; the group whose head came first goes first.
    assert model.calls[1:] == [[(3, 4)], [(1, 8)]]


async def test_dtypes_are_never_mixed(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64)
    first = await occupy(batcher, model)
    tasks = [
        asyncio.create_task(batcher.submit([rows(1, 2)])),
        asyncio.create_task(batcher.submit([rows(1, 2).double()])),
    ]
    await until(lambda: batcher.queued_items == 4)
    model.release()
    (a, _), (b, _) = await asyncio.gather(*tasks)
    await first
    assert a[0].dtype == torch.float32 and b[0].dtype == torch.float64
    assert len(model.calls) == 3


async def test_max_batch_size_is_respected_and_requests_are_never_split(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=4)
    first = await occupy(batcher, model)
    counts = [1, 1, 1, 1, 1, 3, 6, 1]
    inputs = [rows(100 * i, n) for i, n in enumerate(counts)]
    tasks = [asyncio.create_task(batcher.submit([x])) for x in inputs]
    await until(lambda: batcher.queued_items == sum(counts))
    model.release()

    results = await asyncio.gather(*tasks)
    await first
    for x, (outputs, _) in zip(inputs, results, strict=True):
        assert torch.equal(outputs[0], x * 2)
    # In arrival order: 1+1+1+1 | 1+3 | 6 alone (bigger than the maximum) | 1.
    assert [call[0][0] for call in model.calls[1:]] == [4, 4, 6, 1]


async def test_a_full_queue_rejects_at_once_with_a_retry_hint(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64, max_queue_size=4)
    first = await occupy(batcher, model)
    queued = asyncio.create_task(batcher.submit([rows(0, 3)]))
    await until(lambda: batcher.queued_items == 3)

    with pytest.raises(QueueFull) as caught:
        await batcher.submit([rows(0, 2)])
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0
    with pytest.raises(InvalidArgument):  # could never fit, whatever the load
        await batcher.submit([rows(0, 5)])

    model.release()
    await asyncio.gather(first, queued)
    outputs, _ = await batcher.submit([rows(0, 4)])  # room again
    assert outputs[0].shape == (4, 4)


async def test_an_abandoned_request_frees_its_queue_room(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64, max_queue_size=4)
    first = await occupy(batcher, model)
    gone = asyncio.create_task(batcher.submit([rows(0, 4)]))
    await until(lambda: batcher.queued_items == 4)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)

    kept = asyncio.create_task(batcher.submit([rows(0, 2)]))
    await until(lambda: batcher.queued_items == 2)
    model.release()
    await asyncio.gather(first, kept)
    assert [call[0][0] for call in model.calls] == [1, 2]


async def test_an_expired_request_is_dropped_before_compute(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64)
    loop = asyncio.get_running_loop()
    first = await occupy(batcher, model)
    expired = asyncio.create_task(batcher.submit([rows(500, 2)], deadline=loop.time() - 0.001))
    alive = asyncio.create_task(batcher.submit([rows(600, 1)], deadline=loop.time() + 60))
    await until(lambda: batcher.queued_items == 3)
    model.release()

    with pytest.raises(DeadlineExceeded):
        await expired
    outputs, timing = await alive
    await first
    assert torch.equal(outputs[0], rows(600, 1) * 2)
    assert timing.batch_size == 1
    assert model.calls == [[(1, 4)], [(1, 4)]]  # the model never saw the expired rows


async def test_a_cancelled_caller_is_dropped_before_compute(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64)
    first = await occupy(batcher, model)
    cancelled = asyncio.create_task(batcher.submit([rows(0, 5)]))
    kept = asyncio.create_task(batcher.submit([rows(0, 1)]))
    await until(lambda: batcher.queued_items == 6)
    cancelled.cancel()
    model.release()

    await asyncio.gather(first, kept)
    assert cancelled.cancelled()
    assert model.calls == [[(1, 4)], [(1, 4)]]


def _isolations() -> float:
    labels = {"model": "unit", "version": "1"}
    return REGISTRY.get_sample_value(f"{ISOLATIONS._name}_total", labels) or 0.0


async def test_a_failing_batch_fails_only_the_request_at_fault_and_the_next_batch_succeeds(
    closing: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        if bool((x == 666).any()):
            raise RuntimeError("index 666 is out of range")
        return x * 2

    model = GatedModel(fn)
    batcher = make(model, closing, max_batch_size=64)
    first = await occupy(batcher, model)
    before = _isolations()
    neighbour = asyncio.create_task(batcher.submit([rows(1, 2)], request_id="req-neighbour"))
    bad = asyncio.create_task(batcher.submit([rows(666, 1)], request_id="req-bad"))
    after = asyncio.create_task(batcher.submit([rows(3, 4)], request_id="req-after"))
    await until(lambda: batcher.queued_items == 7)
    model.release()

    await first  # an earlier batch is untouched
    with pytest.raises(ModelFailedOnInput) as caught:
        await bad
    assert "index 666 is out of range" in caught.value.message  # the model's own words
    (got,), timing = await neighbour
    assert torch.equal(got, rows(1, 2) * 2) and timing.batch_size == 7
    (got,), _ = await after
    assert torch.equal(got, rows(3, 4) * 2)
    assert "req-bad" in caplog.text and "req-neighbour" not in caplog.text
    assert _isolations() == before + 1
    assert batcher.stats.fail_count == 1

    outputs, _ = await batcher.submit([rows(7, 3)])
    assert torch.equal(outputs[0], rows(7, 3) * 2)


async def test_isolation_finds_every_request_at_fault_in_a_large_batch(closing: Any) -> None:
    calls: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if bool((x == -5).any()):
            raise IndexError("index out of range in self")
        return x + 1

    model = GatedModel(fn)
    batcher = make(model, closing, max_batch_size=64)
    first = await occupy(batcher, model)
    values = [-5.0 if i in (3, 17, 18) else float(i) for i in range(32)]
    tasks = [asyncio.create_task(batcher.submit([rows(v, 1)])) for v in values]
    await until(lambda: batcher.queued_items == 32)
    calls.clear()
    model.release()
    await first
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for value, result in zip(values, results, strict=True):
        if value < 0:
            assert isinstance(result, ModelFailedOnInput)
        else:
            assert not isinstance(result, BaseException)
            assert torch.equal(result[0][0], rows(value + 1, 1))
    assert len(calls) <= 1 + 2 * 32 - 2  # the batch, then at most 2n - 2 halves


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda x: x[:-1], id="too-few-rows"),
        pytest.param(lambda x: x.sum(), id="scalar"),
        pytest.param(lambda x: {"y": x}, id="not-a-tensor"),
    ],
)
async def test_outputs_without_the_batch_length_fail_the_batch(
    closing: Any, fn: Callable[[torch.Tensor], Any]
) -> None:
    batcher = make(fn, closing, max_batch_size=64)
    with pytest.raises(ModelExecutionError):
        await batcher.submit([rows(0, 3)])
    assert batcher.outstanding == 0


async def test_aclose_finishes_what_was_accepted_and_refuses_new_work(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=2, max_queue_delay_s=60)
    first = await occupy(batcher, model)
    queued = [asyncio.create_task(batcher.submit([rows(10 * i, 1)])) for i in range(3)]
    await until(lambda: batcher.queued_items == 3)

    closer = asyncio.create_task(batcher.aclose())
    await until(lambda: batcher.closed)
    with pytest.raises(Draining):
        await batcher.submit([rows(0, 1)])
    done, _ = await asyncio.wait([closer], timeout=0.01)
    assert not done, "aclose returned while accepted requests were waiting"

    model.release()
    await closer
    await first
    for i, task in enumerate(queued):
        outputs, _ = task.result()
        assert torch.equal(outputs[0], rows(10 * i, 1) * 2)
    assert batcher.outstanding == 0


async def test_a_lone_request_does_not_wait_out_the_window(closing: Any) -> None:
    batcher = make(lambda x: x + 1, closing, max_queue_delay_s=3600)
    outputs, timing = await asyncio.wait_for(batcher.submit([rows(0, 1)]), timeout=10)
    assert torch.equal(outputs[0], rows(1, 1))
    assert timing.batch_size == 1


async def test_with_a_free_instance_a_busy_server_waits_for_company_up_to_the_batch_size(
    closing: Any,
) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=3, max_queue_delay_s=3600, instances=2)
    first = await occupy(batcher, model)

    # One instance is free, but a batch is in flight: the lone request waits for company...
    lone = asyncio.create_task(batcher.submit([rows(1, 1)]))
    await until(lambda: batcher.queued_items == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert batcher.queued_items == 1 and len(model.calls) == 1
    # ... and leaves on the free instance as soon as its group is full.
    company = asyncio.create_task(batcher.submit([rows(2, 2)]))
    (lone_out, lone_timing), _ = await asyncio.gather(lone, company)
    assert lone_timing.batch_size == 3 and len(model.calls) == 2
    assert torch.equal(lone_out[0], rows(1, 1) * 2)
    model.release()
    await first


async def test_with_a_free_instance_the_window_releases_a_partial_batch(closing: Any) -> None:
    model = GatedModel()
    batcher = make(model, closing, max_batch_size=64, max_queue_delay_s=0.005, instances=2)
    first = await occupy(batcher, model)
    # The blocker still holds one instance; the window, not the blocker, sends this one.
    outputs, timing = await asyncio.wait_for(batcher.submit([rows(1, 2)]), timeout=10)
    assert torch.equal(outputs[0], rows(1, 2) * 2)
    assert timing.queue_s >= 0.004
    assert not first.done()
    model.release()
    await first


async def test_inputs_must_agree_on_the_batch_dimension(closing: Any) -> None:
    batcher = make(lambda a, b: a + b, closing)
    with pytest.raises(InvalidArgument):
        await batcher.submit([rows(0, 2), rows(0, 3)])
    with pytest.raises(InvalidArgument):
        await batcher.submit([torch.tensor(1.0)])
    outputs, _ = await batcher.submit([rows(0, 2), rows(1, 2)])
    assert torch.equal(outputs[0], rows(0, 2) + rows(1, 2))


async def test_several_inputs_are_concatenated_column_by_column(closing: Any) -> None:
    model = GatedModel(lambda a, b: a * 10 + b.sum(dim=1, keepdim=True))
    batcher = make(model, closing)
    first = await occupy_pair(batcher, model)
    pairs = [(rows(1, 2), rows(5, 2, width=3)), (rows(3, 1), rows(7, 1, width=3))]
    tasks = [asyncio.create_task(batcher.submit([a, b])) for a, b in pairs]
    await until(lambda: batcher.queued_items == 3)
    model.release()
    results = await asyncio.gather(*tasks)
    await first
    for (a, b), (outputs, _) in zip(pairs, results, strict=True):
        assert torch.equal(outputs[0], a * 10 + b.sum(dim=1, keepdim=True))
    assert model.calls[1] == [(3, 4), (3, 3)]


async def occupy_pair(batcher: Batcher, model: GatedModel) -> asyncio.Task[Any]:
    task = asyncio.create_task(batcher.submit([blocker(), torch.zeros(1, 3)]))
    await model.entered.wait()
    return task


async def test_a_model_without_a_batch_dimension_runs_each_request_alone(closing: Any) -> None:
    model = GatedModel(lambda x: x.sum())
    batcher = Batcher(model, BatchConfig(), model_name="unit", version=2, batching=False)
    closing(batcher)
    first = await occupy(batcher, model)
    tasks = [asyncio.create_task(batcher.submit([rows(i, 2)])) for i in range(2)]
    await until(lambda: batcher.outstanding == 3)
    model.release()
    results = await asyncio.gather(first, *tasks)
    assert [r[0][0].item() for r in results[1:]] == [rows(0, 2).sum().item(), rows(1, 2).sum().item()]
    assert len(model.calls) == 3


async def test_warm_up_runs_outside_the_queue_and_the_metrics(closing: Any) -> None:
    batcher = Batcher(lambda x: x * 3, BatchConfig(instances=2), model_name="warm", version=7)
    closing(batcher)
    outputs = await batcher.warm_up([rows(0, 5)])
    assert torch.equal(outputs[0], rows(0, 5) * 3)
    assert BATCH_SIZE.labels("warm", "7")._sum.get() == 0  # noqa: SLF001 - reading the sample

    failing = Batcher(lambda x: x[:1], BatchConfig(), model_name="warm", version=8)
    closing(failing)
    with pytest.raises(ModelExecutionError, match="rows on dim 0"):
        await failing.warm_up([rows(0, 5)])


async def test_metrics_follow_batches_and_are_removed_on_close() -> None:
    batcher = Batcher(lambda x: x, BatchConfig(), model_name="metered", version=1)
    await batcher.submit([rows(0, 3)])
    assert BATCH_SIZE.labels("metered", "1")._sum.get() == 3  # noqa: SLF001 - reading the sample
    await batcher.aclose()
    exported = {s.labels.get("model") for m in QUEUE_DEPTH.collect() for s in m.samples}
    assert "metered" not in exported
