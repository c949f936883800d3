"""Shadow mirroring: a fraction of a model's traffic is copied to its shadow alias's version;
both answers are compared (close or not) and recorded, and the shadow's is never returned.

The copy runs in its own task next to the primary call: it never delays the primary answer,
and when too many copies are in flight, new ones are skipped rather than queued.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from modelyard.tensor_codec import tensor_from_proto
from modelyard.v1 import model_server_service_pb2

__all__ = ["SendShadow", "ShadowRecord", "ShadowMirror", "compare_responses"]

log = logging.getLogger(__name__)

SendShadow = Callable[[str, int, bytes, float, str], Awaitable[bytes]]
"""(model, version, InferRequest bytes, timeout_s, request_id) -> InferResponse bytes."""


@dataclass(frozen=True, slots=True)
class ShadowRecord:
    """One mirrored request: how the shadow's answer compared with the primary's."""

    time: float
    """Unix time of the comparison."""
    request_id: str
    model: str
    version: int
    """The version whose answer was returned."""
    shadow_version: int
    outcome: str
    """"match" (every output close), "mismatch", or "error" (a call failed)."""
    max_abs_diff: float | None = None
    """Largest absolute difference over the outputs both answers have (None: not comparable)."""
    detail: str = ""


def compare_responses(
    primary: bytes, shadow: bytes, *, rtol: float, atol: float
) -> tuple[str, float | None, str]:
    """(outcome, max_abs_diff, detail) of two InferResponse byte strings."""
    a = {t.name: t for t in model_server_service_pb2.InferResponse.FromString(primary).outputs}
    b = {t.name: t for t in model_server_service_pb2.InferResponse.FromString(shadow).outputs}
    if a.keys() != b.keys():
        return "mismatch", None, f"outputs differ: {sorted(a)} vs {sorted(b)}"
    worst: float | None = None
    problems: list[str] = []
    for name in sorted(a):
        x, y = tensor_from_proto(a[name]), tensor_from_proto(b[name])
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{name}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}")
            continue
        if x.numel():
            diff = float((x.double() - y.double()).abs().max())
            worst = diff if worst is None else max(worst, diff)
        if not torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True):
            problems.append(f"{name}: not close")
    if problems:
        return "mismatch", worst, "; ".join(problems)
    return "match", worst, ""


class ShadowMirror:
    """Runs shadow copies and keeps a bounded record of their comparisons.

    Args:
        send: Sends InferRequest bytes to a replica of a version (the router's send path).
        rtol: Relative tolerance of the comparison (`torch.allclose`).
        atol: Absolute tolerance of the comparison.
        max_in_flight: Copies running at once; more are skipped and counted.
        record_size: How many comparisons `records` keeps (the newest).
        on_result: Called with every record (metrics).
    """

    def __init__(
        self,
        send: SendShadow,
        *,
        rtol: float = 1e-4,
        atol: float = 1e-5,
        max_in_flight: int = 64,
        record_size: int = 1000,
        on_result: Callable[[ShadowRecord], None] | None = None,
    ) -> None:
        self._send = send
        self._rtol = rtol
        self._atol = atol
        self._max_in_flight = max_in_flight
        self._on_result = on_result
        self._tasks: set[asyncio.Task[None]] = set()
        self.records: collections.deque[ShadowRecord] = collections.deque(maxlen=record_size)
        self.skipped = 0
        """Copies not made because `max_in_flight` were running."""

    def mirror(
        self,
        model: str,
        version: int,
        shadow_version: int,
        request: bytes,
        primary: asyncio.Future[bytes | None],
        timeout_s: float,
        request_id: str,
    ) -> bool:
        """Start a copy of `request` (InferRequest bytes for `shadow_version`); it is compared
        with `primary` once both are done (the router sets it to the primary's InferResponse
        bytes, or None when the primary failed). Returns False when the copy was skipped."""
        if len(self._tasks) >= self._max_in_flight:
            self.skipped += 1
            return False
        task = asyncio.create_task(
            self._run(model, version, shadow_version, request, primary, timeout_s, request_id),
            name=f"shadow-{request_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(
        self,
        model: str,
        version: int,
        shadow_version: int,
        request: bytes,
        primary: asyncio.Future[bytes | None],
        timeout_s: float,
        request_id: str,
    ) -> None:
        def record(outcome: str, diff: float | None = None, detail: str = "") -> None:
            entry = ShadowRecord(
                time.time(), request_id, model, version, shadow_version, outcome, diff, detail
            )
            self.records.append(entry)
            if self._on_result is not None:
                self._on_result(entry)

        try:
            shadow = await self._send(model, shadow_version, request, timeout_s, request_id)
        except Exception as exc:  # noqa: BLE001 - a failed copy is recorded, never raised
            record("error", detail=f"shadow call failed: {exc!r}"[:300])
            return
        answer = await primary
        if answer is None:
            record("error", detail="primary call failed")
            return
        try:
            outcome, diff, detail = compare_responses(answer, shadow, rtol=self._rtol, atol=self._atol)
        except Exception as exc:  # noqa: BLE001 - undecodable answers are a mismatch to record
            outcome, diff, detail = "error", None, f"cannot compare: {exc!r}"[:300]
        record(outcome, diff, detail)

    async def wait_idle(self) -> None:
        """Wait until every running copy has finished (tests, and drain)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
