"""Dynamic batching for one loaded model version: many small requests, few large forwards.

A request carries n >= 1 items on dim 0 of every input. Waiting requests are grouped by the
rest of their shapes and their dtypes (a group's requests can be concatenated on dim 0;
different groups are never mixed). A batch is the oldest requests of one group, in arrival
order, up to `max_batch_size` items; a request is never split, and one bigger than
`max_batch_size` runs alone.

When a batch is dispatched (the rule; event-driven, no polling):

1. Only while an instance is free: at most `instances` batches are in flight (the
   in-flight count is the semaphore; it lives on the event loop, so taking a slot never
   suspends the caller).
2. At once when *no* batch is in flight: the server is idle, so waiting for company would
   only add latency. This is Triton's default ("largest available batch, no delay") and is
   what a lone caller sees: its request goes straight to a worker thread.
3. Otherwise (another batch is computing, so load is known to exist and more requests are
   likely on their way) a group is dispatched when it holds `max_batch_size` items, or when
   `max_queue_delay` has passed since its oldest request arrived (measured with
   `loop.time()`, a timer armed with `loop.call_at`), whichever comes first.

With one instance, rule 3 never holds a free worker back: while the only worker computes,
requests pile up, and when it finishes (rule 2) they all leave as one batch. The batch size
thus follows the load by itself. With several instances, rule 3 stops a busy server from
feeding every free worker batches of one.

With `preferred_batch_sizes`, a group that reaches one of them leaves at once (rule 3), as a
batch of the largest preferred size it can fill; the rest of the group waits for the next
batch (Triton's preferred sizes, e.g. sizes a GPU kernel is tuned for).

Where the forward runs (`execution`):

- `thread`: on a dedicated `ThreadPoolExecutor(max_workers=instances)`; the event loop keeps
  decoding requests while a batch computes. The only thread hop per request is its batch's,
  but each hop hands the GIL between the loop and the worker, and under load the worker waits
  for the GIL the loop holds (up to `sys.getswitchinterval()` per hand-over): for a forward of
  a fraction of a millisecond that costs more than the forward.
- `loop`: on the event loop itself, between requests: no hop, no GIL hand-over. The loop is
  busy for the forward's duration, so this suits forwards well under a millisecond. A batch
  then forms from the requests that arrive while the loop goes round: dispatch is deferred by
  one turn of the loop at a time as long as new requests keep arriving (under load each turn
  brings more), up to `max_batch_size` or `max_queue_delay`; a lone caller waits two turns
  (microseconds).
- `auto` (default): `loop` when the version runs on the CPU with one instance and its warm-up
  forward at `max_batch_size` took at most `LOOP_MAX_FORWARD_S`; `thread` otherwise. A fastest
  forward just over the bound (within `RETIME_FACTOR` times it) is timed again, up to
  `RETIME_RUNS` more times (`retime`): a machine busy at load time (a cluster starting) slows a
  few forwards, not the fastest of many.

Requests whose future is done (the caller went away) or whose deadline has passed are
dropped when their batch is formed, before compute. The waiting queue is bounded in items:
beyond `max_queue_size`, `submit` raises QueueFull at once (never blocks).

The forward runs inside `torch.inference_mode()`. Outputs are checked to have the batch's
item count on dim 0 and split back with `torch.split`. A batch is an isolation boundary: when
its forward raises, halves of it are run again (down to single requests, at most 2n - 2 extra
forwards for n requests) so that only the requests whose own inputs make the model fail get
an error (ModelFailedOnInput, INVALID_ARGUMENT, with the model's one-line message), and every
other request in the batch gets its answer. The batcher goes on either way.

Usage::

    batcher = Batcher(module, BatchConfig(max_batch_size=64), model="mlp", version=3)
    outputs, timing = await batcher.submit([x], deadline=loop.time() + 1.0)
    ...
    await batcher.aclose()   # finishes what it accepted, then stops
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from prometheus_client import Counter, Gauge, Histogram

from modelyard.errors import (
    DeadlineExceeded,
    Draining,
    InvalidArgument,
    ModelExecutionError,
    ModelFailedOnInput,
    ModelyardError,
    QueueFull,
)
from modelyard.telemetry import LATENCY_BUCKETS_S

__all__ = [
    "BatchConfig",
    "BatchTiming",
    "BatcherStats",
    "Batcher",
    "ModelFn",
    "QUEUE_SECONDS",
    "COMPUTE_SECONDS",
    "BATCH_SIZE",
    "QUEUE_DEPTH",
    "ISOLATIONS",
    "INPUT_FAILURES",
    "EXECUTIONS",
    "LOOP_MAX_FORWARD_S",
    "RETIME_FACTOR",
    "RETIME_RUNS",
]

log = logging.getLogger(__name__)

ModelFn = Callable[..., Any]
"""Called with the batched input tensors as positional arguments (signature order); returns
a tensor or a tuple/list of tensors, each with the batch's item count on dim 0."""

QUEUE_SECONDS = Histogram(
    "modelyard_model_server_queue_seconds",
    "Time a request waited in its version's batch queue before its batch started.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS_S,
)
COMPUTE_SECONDS = Histogram(
    "modelyard_model_server_compute_seconds",
    "Time of one batch on its worker thread: concatenate, forward, check and split.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_SIZE = Histogram(
    "modelyard_model_server_batch_size",
    "Items per batched forward pass.",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
ISOLATIONS = Counter(
    "modelyard_model_server_batch_isolations",
    "Batches whose forward failed with more than one request in them, rerun in halves to "
    "find the requests at fault (the others were answered).",
    ["model", "version"],
)
INPUT_FAILURES = Counter(
    "modelyard_model_server_input_failures",
    "Requests whose own forward failed (MODEL_FAILED_ON_INPUT), alone or isolated from a batch.",
    ["model", "version"],
)
QUEUE_DEPTH = Gauge(
    "modelyard_model_server_queue_depth",
    "Items waiting in a version's batch queue (not counting batches being computed).",
    ["model", "version"],
)

_CLOCK_SLACK_S = 1e-6

EXECUTIONS = ("auto", "loop", "thread")
"""Where a batch's forward may run; see the module docstring."""

LOOP_MAX_FORWARD_S = 0.001
"""`auto` runs a CPU version on the event loop when its warm-up forward at `max_batch_size`
took at most this long (a longer one would hold up every other request on the loop)."""

RETIME_FACTOR = 4.0
"""A fastest warm-up forward over `LOOP_MAX_FORWARD_S` but within this many times it is too
close to call on three runs: `retime` times it again."""

RETIME_RUNS = 20
"""At most this many more forwards at the largest batch (`retime`): about 20 ms for a forward
near the bound, and none for one well over it."""

# Which batcher owns the series of a (model, version) label pair (the newest one).
_METRIC_OWNERS: weakref.WeakValueDictionary[tuple[str, str], Batcher] = weakref.WeakValueDictionary()


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """How a version's requests are batched.

    Usage::

        BatchConfig(max_batch_size=64, max_queue_delay_s=0.002, max_queue_size=1024, instances=1)
        BatchConfig(max_batch_size=64, preferred_batch_sizes=(16, 32), execution="thread")
    """

    max_batch_size: int = 64
    """Most items in one forward pass (a bigger request runs alone)."""
    max_queue_delay_s: float = 0.002
    """Longest a group waits for company while another batch is in flight."""
    max_queue_size: int = 1024
    """Most items waiting; beyond it `submit` raises QueueFull."""
    instances: int = 1
    """Worker threads, hence batches in flight at once."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes dispatched as soon as a group can fill one (the largest it can), without
    waiting for `max_batch_size` or the window; empty: none."""
    execution: str = "auto"
    """Where the forward runs: "thread", "loop" or "auto" (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_size < 1 or self.instances < 1:
            raise ValueError("max_batch_size, max_queue_size and instances must be >= 1")
        if self.max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        preferred = self.preferred_batch_sizes
        if any(size < 1 or size > self.max_batch_size for size in preferred):
            raise ValueError(
                f"preferred_batch_sizes {list(preferred)} must lie between 1 and max_batch_size "
                f"({self.max_batch_size})"
            )
        # Normalised (sorted, unique) so that equal settings compare equal.
        object.__setattr__(self, "preferred_batch_sizes", tuple(sorted(set(preferred))))
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution {self.execution!r} is not one of {', '.join(EXECUTIONS)}")
        if self.execution == "loop" and self.instances != 1:
            raise ValueError("execution 'loop' runs one batch at a time: instances must be 1")


@dataclass(frozen=True, slots=True)
class BatchTiming:
    """Where one request's server time went."""

    queue_s: float
    """From `submit` to its batch leaving for a worker."""
    compute_s: float
    """Its batch's time on the worker thread."""
    batch_size: int
    """Items in its batch."""


@dataclass(slots=True)
class BatcherStats:
    """Cumulative figures of one batcher since it started (for OIP ModelStatistics).

    Written only on the event loop, so reading them there needs no lock.
    """

    success_count: int = 0
    """Requests answered."""
    success_s: float = 0.0
    """Sum of their queue + compute time."""
    fail_count: int = 0
    """Requests whose batch failed, or dropped for their deadline."""
    fail_s: float = 0.0
    queue_s: float = 0.0
    """Sum of the answered requests' queue time."""
    compute_s: float = 0.0
    """Sum of the answered requests' batch compute time."""
    inference_count: int = 0
    """Items (rows on dim 0) computed."""
    execution_count: int = 0
    """Batches (forward passes) computed."""
    last_inference_ms: int = 0
    """Wall-clock time of the last answered batch, in Unix milliseconds."""
    batches: dict[int, tuple[int, float]] = field(default_factory=dict)
    """Batch size -> (batches of that size, their total compute seconds)."""


class _Request:
    __slots__ = ("inputs", "items", "deadline", "future", "enqueued_at", "submitted", "queue_s", "request_id")

    def __init__(
        self,
        inputs: Sequence[torch.Tensor],
        items: int,
        deadline: float | None,
        future: asyncio.Future[tuple[list[torch.Tensor], BatchTiming]],
        enqueued_at: float,
        request_id: str,
    ) -> None:
        self.inputs = inputs
        self.items = items
        self.deadline = deadline
        self.future = future
        self.enqueued_at = enqueued_at
        """`loop.time()` at submit: for the window and deadlines (the loop's clock)."""
        self.submitted = time.perf_counter()
        """For the queue time: a loop's clock may be coarse (uvloop's moves in whole
        milliseconds, once per turn of the loop)."""
        self.queue_s = 0.0
        self.request_id = request_id


class _Group:
    """Waiting requests that may share a batch: same dtypes and non-batch dims."""

    __slots__ = ("key", "requests", "items")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.requests: deque[_Request] = deque()
        self.items = 0


class _BadOutput(Exception):
    """The model's result cannot be split back (wrong type, or wrong size on dim 0)."""


class _State(enum.Enum):
    OPEN = 1
    CLOSING = 2
    CLOSED = 3


T = TypeVar("T")


def _set_result_if_not_done(future: asyncio.Future[T], result: T) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception_if_not_done(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


MAX_ERROR_CHARS = 300
"""Most characters of a model's own error message passed on to the caller."""


def _last_line(exc: BaseException) -> str:
    """`Type: message` of a model's exception, its last non-empty line only (TorchScript's
    messages carry the interpreter's traceback before it), cut to `MAX_ERROR_CHARS`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


def _as_tensor_list(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and result and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise _BadOutput(f"the model returned {type(result).__name__}, not a tensor or a tuple of tensors")


class Batcher:
    """Batches the requests of one loaded model version onto its worker threads.

    Create it on the event loop that will submit to it. See the module docstring for the
    dispatch rule.

    Args:
        model: The forward function (an `nn.Module` or any callable, see `ModelFn`).
        config: Batch sizes, window, queue bound and instances.
        model_name: The model's name, for metrics and logs.
        version: The version number, for metrics and logs.
        batching: False for a model without a batch dimension: every request then runs
            alone and its outputs are returned whole.
        device: Where the forward runs ("cpu", "cuda:N"); `auto` execution picks the loop
            only on the CPU.
    """

    def __init__(
        self,
        model: ModelFn,
        config: BatchConfig,
        *,
        model_name: str = "model",
        version: int = 0,
        batching: bool = True,
        device: str = "cpu",
    ) -> None:
        self._model = model
        self._config = config
        self._name = model_name
        self._version = version
        self._batching = batching
        self._max_items = config.max_batch_size if batching else 1
        self._preferred = config.preferred_batch_sizes if batching else ()
        self._device = device
        self._on_loop = config.execution == "loop"
        self._tick: asyncio.Handle | None = None
        self._tick_items = 0
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(
            max_workers=config.instances, thread_name_prefix=f"model-{model_name}-v{version}"
        )
        self._groups: dict[Hashable, _Group] = {}
        self._queued_items = 0
        self._queued_requests = 0
        self._in_flight = 0
        self._in_flight_requests = 0
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._state = _State.OPEN
        # A rough recent batch time, only for the retry hint of QueueFull.
        self._recent_batch_s = 0.01
        labels = (model_name, str(version))
        self._labels = labels
        self._queue_seconds = QUEUE_SECONDS.labels(*labels)
        self._compute_seconds = COMPUTE_SECONDS.labels(*labels)
        self._batch_size = BATCH_SIZE.labels(*labels)
        self._isolations = ISOLATIONS.labels(*labels)
        self._input_failures = INPUT_FAILURES.labels(*labels)
        # Read at scrape time instead of written on every enqueue and dispatch: a gauge
        # write takes a lock, and the hot path would pay it twice per request.
        # A weak reference: the metrics registry must not keep an unloaded model alive.
        this = weakref.ref(self)
        QUEUE_DEPTH.labels(*labels).set_function(
            lambda: batcher._queued_items if (batcher := this()) is not None else 0
        )
        _METRIC_OWNERS[labels] = self
        self.stats = BatcherStats()
        """Cumulative figures, see `BatcherStats`."""
        self.warm_up_s: dict[int, float] = {}
        """Batch size -> the fastest warm-up forward at that size, in seconds."""

    # -- public ----------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Requests waiting or being computed."""
        return self._queued_requests + self._in_flight_requests

    @property
    def queued_items(self) -> int:
        """Items waiting for a batch."""
        return self._queued_items

    @property
    def execution(self) -> str:
        """Where batches run now: "loop" or "thread"."""
        return "loop" if self._on_loop else "thread"

    @property
    def closed(self) -> bool:
        """True once `aclose()` started: no new requests are taken."""
        return self._state is not _State.OPEN

    async def submit(
        self,
        inputs: Sequence[torch.Tensor],
        deadline: float | None = None,
        *,
        request_id: str = "",
    ) -> tuple[list[torch.Tensor], BatchTiming]:
        """Queue one request and wait for its share of a batch's outputs.

        Args:
            inputs: The input tensors in signature order; each carries the request's n >= 1
                items on dim 0.
            deadline: `loop.time()` after which the request is dropped if not yet computed.
            request_id: Logged if its batch fails.

        Returns:
            The request's rows of every output, and where its time went.

        Raises:
            QueueFull: the queue holds `max_queue_size` items (with a retry hint).
            Draining: the batcher is closing.
            DeadlineExceeded: the deadline passed before the request's batch started.
            ModelExecutionError: its batch failed.
            InvalidArgument: the inputs do not share a dim 0 size.
        """
        if self._state is not _State.OPEN:
            raise Draining(f"model {self._name!r} version {self._version} is being unloaded")
        items, key = self._items_and_key(inputs)
        if self._queued_items + items > self._config.max_queue_size:
            self._purge_abandoned()
            if self._queued_items + items > self._config.max_queue_size:
                raise self._queue_full(items)
        loop = self._loop
        future: asyncio.Future[tuple[list[torch.Tensor], BatchTiming]] = loop.create_future()
        request = _Request(inputs, items, deadline, future, loop.time(), request_id)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        group.requests.append(request)
        group.items += items
        self._queued_items += items
        self._queued_requests += 1
        self._idle.clear()
        if self._on_loop:
            if self._tick is None:
                self._tick_items = 0  # the first turn always waits for one more
                self._tick = loop.call_soon(self._on_tick)
        else:
            self._dispatch()
        # Cancelling the caller cancels `future`; the request is then dropped unseen.
        return await future

    async def warm_up(self, inputs: Sequence[torch.Tensor], *, repeats: int = 3) -> list[torch.Tensor]:
        """Run the model on `inputs` on every worker thread, `repeats` times, outside the
        queue and the metrics (before the version is ready).

        Returns:
            The outputs of the last run, whole.

        Raises:
            ModelExecutionError: the model failed or its outputs cannot be split back; the
                message says why (it is for the operator, not a caller).
        """
        items, _ = self._items_and_key(inputs)
        for _ in range(repeats):
            runs = [
                self._loop.run_in_executor(self._executor, self._compute, [inputs], [items])
                for _ in range(self._config.instances)
            ]
            results = await asyncio.gather(*runs)
            for per_request, _ in results:
                (outcome,) = per_request
                if isinstance(outcome, _BadOutput):
                    raise ModelExecutionError(f"warm-up at batch size {items}: {outcome}") from None
                if isinstance(outcome, BaseException):
                    raise ModelExecutionError(
                        f"warm-up at batch size {items} failed: {type(outcome).__name__}: {outcome}"
                    ) from outcome
            fastest = min(seconds for _, seconds in results)
            self.warm_up_s[items] = min(fastest, self.warm_up_s.get(items, math.inf))
        outputs = results[-1][0][0]
        assert not isinstance(outputs, BaseException)
        return outputs

    async def retime(self, inputs: Sequence[torch.Tensor]) -> None:
        """Time the forward at `inputs`' size (the largest warmed up) again, up to
        `RETIME_RUNS` times, while `auto`'s choice is too close to call: a CPU version with one
        instance whose fastest forward there is over `LOOP_MAX_FORWARD_S` but within
        `RETIME_FACTOR` times it. Call after `warm_up`, before `settle_execution`."""
        if self._config.execution != "auto" or self._device != "cpu" or self._config.instances != 1:
            return
        items, _ = self._items_and_key(inputs)
        for _ in range(RETIME_RUNS):
            fastest = self.warm_up_s.get(items, math.inf)
            if not LOOP_MAX_FORWARD_S < fastest <= LOOP_MAX_FORWARD_S * RETIME_FACTOR:
                return
            await self.warm_up(inputs, repeats=1)

    def settle_execution(self) -> str:
        """Decide where `auto` runs batches, from the warm-up timings; call after warm-up.

        Returns:
            "loop" or "thread".
        """
        if self._config.execution == "auto":
            largest = max(self.warm_up_s, default=None)
            self._on_loop = (
                self._device == "cpu"
                and self._config.instances == 1
                and largest is not None
                and self.warm_up_s[largest] <= LOOP_MAX_FORWARD_S
            )
        return self.execution

    async def aclose(self) -> None:
        """Stop taking requests, finish every accepted one (at once, without waiting out the
        window), then stop the worker threads. Safe to call twice."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSING
        self._dispatch()
        await self._idle.wait()
        for handle in (self._timer, self._tick):
            if handle is not None:
                handle.cancel()
        self._timer = self._tick = None
        if self._state is _State.CLOSED:  # a concurrent aclose() finished first
            return
        self._state = _State.CLOSED
        # Every batch has finished, so the threads are idle and exit at once.
        self._executor.shutdown(wait=False)
        # A reconfigured version gets a new batcher with the same labels before the old one
        # closes: the series then belong to the new one and stay.
        if _METRIC_OWNERS.get(self._labels) is self:
            del _METRIC_OWNERS[self._labels]
            metrics = (QUEUE_SECONDS, COMPUTE_SECONDS, BATCH_SIZE, QUEUE_DEPTH, ISOLATIONS, INPUT_FAILURES)
            for metric in metrics:
                try:
                    metric.remove(*self._labels)
                except KeyError:
                    pass

    # -- queueing --------------------------------------------------------------------------

    def _items_and_key(self, inputs: Sequence[torch.Tensor]) -> tuple[int, Hashable]:
        if not inputs:
            raise InvalidArgument("a request needs at least one input tensor", field="inputs")
        if not self._batching:
            return 1, None
        first = inputs[0]
        if first.dim() == 0:
            raise InvalidArgument("inputs need a batch dimension (dim 0)", field="inputs")
        items = first.shape[0]
        if len(inputs) == 1:
            return items, (first.dtype, first.shape[1:])
        for tensor in inputs[1:]:
            if tensor.dim() == 0 or tensor.shape[0] != items:
                raise InvalidArgument(
                    "every input must carry the same number of items on dim 0 "
                    f"(got {[tuple(t.shape) for t in inputs]})",
                    field="inputs",
                )
        return items, tuple((t.dtype, t.shape[1:]) for t in inputs)

    def _queue_full(self, items: int) -> Exception:
        limit = self._config.max_queue_size
        if items > limit:
            return InvalidArgument(
                f"the request carries {items} items; model {self._name!r} queues at most {limit}",
                field="inputs",
            )
        backlog_batches = math.ceil(self._queued_items / self._max_items)
        retry_after_s = max(self._config.max_queue_delay_s, self._recent_batch_s * backlog_batches)
        return QueueFull(
            f"model {self._name!r} version {self._version} has {self._queued_items} items "
            f"queued (limit {limit}); retry later",
            retry_after_s=retry_after_s,
            metadata={"model": self._name, "version": str(self._version)},
        )

    def _purge_abandoned(self) -> None:
        """Forget requests whose caller went away, to make room (only when the queue is full)."""
        for key, group in list(self._groups.items()):
            kept: deque[_Request] = deque()
            for request in group.requests:
                if request.future.done():
                    self._forget(group, request)
                else:
                    kept.append(request)
            group.requests = kept
            if not kept:
                del self._groups[key]
        self._check_idle()

    def _forget(self, group: _Group, request: _Request) -> None:
        group.items -= request.items
        self._queued_items -= request.items
        self._queued_requests -= 1

    # -- dispatch --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Launch every batch the rule allows now; arm the window timer for the rest."""
        while self._in_flight < self._config.instances and self._groups:
            group = self._ready_group()
            if group is None:
                return
            batch = self._take(group)
            if batch:
                self._launch(batch)
        self._check_idle()

    def _ready_group(self) -> _Group | None:
        now = self._loop.time()
        dispatch_any = self._in_flight == 0 or self._state is not _State.OPEN
        delay = self._config.max_queue_delay_s
        best: _Group | None = None
        next_due = math.inf
        full = self._preferred[0] if self._preferred else self._max_items
        for group in self._groups.values():
            head_at = group.requests[0].enqueued_at
            due = head_at + delay
            if dispatch_any or group.items >= full or due <= now + _CLOCK_SLACK_S:
                if best is None or head_at < best.requests[0].enqueued_at:
                    best = group
            else:
                next_due = min(next_due, due)
        if best is None:
            self._arm_timer(next_due)
        return best

    def _arm_timer(self, when: float) -> None:
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _on_tick(self) -> None:
        """Loop execution: dispatch once a turn of the loop brought no new request (or the
        batch is full, or its oldest request has waited `max_queue_delay`). The first turn
        after a request always waits one more: the requests of a burst reach `submit` over
        the next turns, not in the one that scheduled this."""
        self._tick = None
        grew = self._queued_items > self._tick_items
        if grew and self._state is _State.OPEN and self._queued_items < self._max_items:
            oldest = min(group.requests[0].enqueued_at for group in self._groups.values())
            if self._loop.time() - oldest < self._config.max_queue_delay_s:
                self._tick_items = self._queued_items
                self._tick = self._loop.call_soon(self._on_tick)
                return
        self._dispatch()

    def _limit(self, group: _Group) -> int:
        """Most items the next batch of `group` takes: the largest preferred size it fills,
        else `max_batch_size`."""
        for size in reversed(self._preferred):
            if group.items >= size:
                return size
        return self._max_items

    def _take(self, group: _Group) -> list[_Request]:
        """The next batch from a group, dropping abandoned and expired requests on the way."""
        now = self._loop.time()
        started = time.perf_counter()
        requests = group.requests
        limit = self._limit(group)
        batch: list[_Request] = []
        items = 0
        while requests:
            request = requests[0]
            if request.future.done():  # the caller went away
                requests.popleft()
                self._forget(group, request)
                continue
            if request.deadline is not None and request.deadline <= now:
                requests.popleft()
                self._forget(group, request)
                waited_ms = (now - request.enqueued_at) * 1000
                self.stats.fail_count += 1
                self.stats.fail_s += now - request.enqueued_at
                _set_exception_if_not_done(
                    request.future,
                    DeadlineExceeded(
                        f"the deadline passed after {waited_ms:.1f} ms in the queue of model "
                        f"{self._name!r} version {self._version}, before compute"
                    ),
                )
                continue
            if batch and items + request.items > limit:
                break
            requests.popleft()
            self._forget(group, request)
            request.queue_s = started - request.submitted
            batch.append(request)
            items += request.items
            if items >= limit:
                break
        if not requests:
            del self._groups[group.key]
        return batch

    def _launch(self, batch: list[_Request]) -> None:
        self._in_flight += 1
        self._in_flight_requests += len(batch)
        observe = self._queue_seconds.observe
        for request in batch:
            observe(request.queue_s)
        inputs = [r.inputs for r in batch]
        counts = [r.items for r in batch]
        if self._on_loop:
            # No thread, no future: compute now, then complete (the caller's loop goes on to
            # the next batch, so no re-dispatch from here).
            self._in_flight -= 1
            self._in_flight_requests -= len(batch)
            try:
                result = self._compute(inputs, counts)
            except Exception as exc:  # noqa: BLE001 - fails only this batch, as on a thread
                self._fail_batch(batch, sum(counts), exc)
            else:
                self._complete_batch(batch, sum(counts), result)
            return
        future = self._loop.run_in_executor(self._executor, self._compute, inputs, counts)
        future.add_done_callback(functools.partial(self._on_batch_done, batch, sum(counts)))

    # -- compute (a worker thread, or the loop) --------------------------------------------

    def _compute(
        self, inputs: list[Sequence[torch.Tensor]], counts: list[int]
    ) -> tuple[list[list[torch.Tensor] | BaseException], float]:
        """Concatenate, forward, check and split one batch.

        When the batch's forward fails and it holds more than one request, the requests at
        fault are found by running halves of the batch (recursively, down to single
        requests): only a request whose own forward fails gets an exception in its place;
        every other request gets its outputs. At most 2n - 2 extra forwards for n requests.
        """
        start = time.perf_counter()
        with torch.inference_mode():
            try:
                per_request: list[list[torch.Tensor] | BaseException] = list(self._forward(inputs, counts))
            except Exception as exc:  # noqa: BLE001 - isolated below, reported per request
                if len(inputs) == 1:
                    per_request = [exc]
                else:
                    per_request = self._isolate(inputs, counts)
                    self._isolations.inc()
        return per_request, time.perf_counter() - start

    def _forward(
        self, inputs: Sequence[Sequence[torch.Tensor]], counts: Sequence[int]
    ) -> list[list[torch.Tensor]]:
        """One forward of the requests `inputs` (their item `counts`), split back per request."""
        if len(inputs) == 1:
            batched = inputs[0]
        else:
            batched = [torch.cat(column) for column in zip(*inputs, strict=True)]
        outputs = _as_tensor_list(self._model(*batched))
        if not self._batching:
            return [outputs]
        total = sum(counts)
        for index, output in enumerate(outputs):
            if output.dim() == 0 or output.shape[0] != total:
                raise _BadOutput(
                    f"output {index} has shape {list(output.shape)}; a batch of {total} items "
                    f"needs {total} rows on dim 0"
                )
        if len(counts) == 1:
            return [outputs]
        columns = [torch.split(output, list(counts)) for output in outputs]
        return [list(row) for row in zip(*columns, strict=True)]

    def _isolate(
        self, inputs: Sequence[Sequence[torch.Tensor]], counts: Sequence[int]
    ) -> list[list[torch.Tensor] | BaseException]:
        """The outputs of each half of a failed batch, halving again where a half fails."""
        middle = len(inputs) // 2
        results: list[list[torch.Tensor] | BaseException] = []
        for part, part_counts in ((inputs[:middle], counts[:middle]), (inputs[middle:], counts[middle:])):
            try:
                results.extend(self._forward(part, part_counts))
            except Exception as exc:  # noqa: BLE001 - the culprit is a single request
                if len(part) == 1:
                    results.append(exc)
                else:
                    results.extend(self._isolate(part, part_counts))
        return results

    # -- completion (event loop) -----------------------------------------------------------

    def _on_batch_done(
        self,
        batch: list[_Request],
        total: int,
        future: asyncio.Future[tuple[list[list[torch.Tensor] | BaseException], float]],
    ) -> None:
        self._in_flight -= 1
        self._in_flight_requests -= len(batch)
        try:
            if future.cancelled():
                self._fail_batch(batch, total, None)
            elif (exc := future.exception()) is not None:
                self._fail_batch(batch, total, exc)
            else:
                self._complete_batch(batch, total, future.result())
        finally:
            self._dispatch()

    def _complete_batch(
        self,
        batch: list[_Request],
        total: int,
        result: tuple[list[list[torch.Tensor] | BaseException], float],
    ) -> None:
        """Record a computed batch and hand every request its outputs, or its own failure."""
        try:
            per_request, compute_s = result
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * compute_s
            self._compute_seconds.observe(compute_s)
            self._batch_size.observe(total)
            stats = self.stats
            stats.inference_count += total
            stats.execution_count += 1
            stats.last_inference_ms = int(time.time() * 1000)
            count, seconds = stats.batches.get(total, (0, 0.0))
            stats.batches[total] = (count + 1, seconds + compute_s)
            for request, outcome in zip(batch, per_request, strict=True):
                if isinstance(outcome, BaseException):
                    self._fail_request(request, outcome, alone=len(batch) == 1)
                    continue
                stats.success_count += 1
                stats.queue_s += request.queue_s
                stats.compute_s += compute_s
                stats.success_s += request.queue_s + compute_s
                _set_result_if_not_done(
                    request.future, (outcome, BatchTiming(request.queue_s, compute_s, total))
                )
        except Exception as exc:  # noqa: BLE001 - a bug here must not strand the waiters
            log.exception("completing a batch of %s v%d failed", self._name, self._version)
            self._fail_batch(batch, total, exc)

    def _fail_request(self, request: _Request, exc: BaseException, *, alone: bool) -> None:
        """One request whose own forward failed: the others in its batch were answered."""
        self.stats.fail_count += 1
        self.stats.fail_s += request.queue_s
        self._input_failures.inc()
        where = f"model {self._name!r} version {self._version}"
        if isinstance(exc, _BadOutput):
            log.error(
                "%s returned unusable outputs (request id %s): %s", where, request.request_id or "-", exc
            )
            error: ModelyardError = ModelExecutionError(
                f"{where} returned outputs that do not match its signature for this request"
            )
        else:
            # One line, not the trace: a caller can send such inputs at any rate.
            log.warning(
                "%s failed on the input of request %s%s: %s",
                where,
                request.request_id or "-",
                "" if alone else " (isolated from its batch)",
                _last_line(exc),
            )
            error = ModelFailedOnInput(
                f"{where} failed on this request's input: {_last_line(exc)}",
                metadata={"model": self._name, "version": str(self._version)},
            )
        _set_exception_if_not_done(request.future, error)

    def _fail_batch(self, batch: list[_Request], total: int, exc: BaseException | None) -> None:
        request_ids = ",".join(r.request_id for r in batch if r.request_id) or "-"
        if isinstance(exc, _BadOutput):
            log.error(
                "model %s v%d returned unusable outputs for a batch of %d items (request ids %s): %s",
                self._name,
                self._version,
                total,
                request_ids,
                exc,
            )
        else:
            log.error(
                "model %s v%d failed on a batch of %d items (request ids %s)",
                self._name,
                self._version,
                total,
                request_ids,
                exc_info=exc,
            )
        self.stats.fail_count += len(batch)
        self.stats.fail_s += sum(r.queue_s for r in batch)
        for request in batch:
            # One error object per caller: a raised exception collects its traceback.
            _set_exception_if_not_done(
                request.future,
                ModelExecutionError(
                    f"model {self._name!r} version {self._version} failed while computing the "
                    "batch that held this request; the server log has the details"
                ),
            )

    def _check_idle(self) -> None:
        if self._queued_requests == 0 and self._in_flight == 0:
            self._idle.set()
