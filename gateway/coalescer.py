"""Coalescing: concurrent calls for the same version become one call to a model server.

Calls that wait for the same (model, version) with inputs of the same names, dtypes and
non-batch dimensions are joined along the batch
dimension (dim 0) into one InferRequest, and the answer is split back by rows. Row-major
tensors joined along dim 0 are their bytes one after the other, so joining and splitting are
byte slicing: no tensor is decoded.

It adds no waiting at low load: while few calls for a version are running, each goes out
alone, as it came. Under load, calls wait in groups for a free slot, and the model server
(whose per-call cost is what limits a Python server) sees a few large calls instead of many
small ones.

A joined call is an isolation boundary between its callers: only calls already checked in
full against the version's signature are joined (`gateway.dataplane` checks them first, so
every member's bytes are exactly its rows); the joined call carries a request id of its own,
never a member's; and when it fails with INVALID_ARGUMENT (the model failed on one member's
input), each member is sent again alone, so only the member at fault gets the error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from modelyard.errors import ModelExecutionError
from modelyard.rpc.context import new_request_id
from modelyard.v1 import model_server_service_pb2 as ms
from modelyard.validation import WireTensor

__all__ = ["Coalescer", "coalesce_key"]

Send = Callable[[bytes, float, str, int], Awaitable[bytes]]
"""(InferRequest bytes, timeout_s, request_id, callers carried) -> InferResponse bytes."""

log = logging.getLogger(__name__)

CoalesceKey = tuple[Any, ...]


def coalesce_key(
    model: str, version: int, inputs: Sequence[WireTensor], output_names: Sequence[str]
) -> tuple[CoalesceKey, int] | None:
    """(key, items) of a call that may be joined with others of the same key, or None.

    `inputs` must have passed the version's `InputCheck` (so they are in signature order and
    their bytes match their shapes). Every input must have a batch dimension of the same size;
    calls join only with calls whose inputs match in name, dtype and every other dimension,
    and that ask for the same outputs.
    """
    if not inputs:
        return None
    items = -1
    parts = []
    for tensor in inputs:
        shape = tensor.shape
        if not shape:
            return None
        if items < 0:
            items = shape[0]
        elif shape[0] != items:
            return None
        parts.append((tensor.name, tensor.data_type, tuple(shape[1:])))
    if items <= 0:
        return None
    return (model, version, tuple(parts), tuple(output_names)), items


@dataclass(eq=False)
class _Member:
    inputs: Sequence[WireTensor]
    items: int
    forwarded: bytes
    request_id: str
    future: asyncio.Future[bytes]
    echo_id: str = ""
    """The request id its answer carries (the caller's own, as a model server would echo)."""


@dataclass(eq=False)
class _Group:
    model: str
    version: int
    send: Send
    output_names: Sequence[str]
    members: list[_Member] = field(default_factory=list)
    items: int = 0
    timeout_s: float = 0.0


class Coalescer:
    """Joins compatible calls that wait for the same version (see the module docstring).

    A call goes out at once, alone, while fewer than `max_in_flight` calls for its version
    are running from this gateway. Over that, it waits in a group with the calls of the same
    key, and the group goes out as one call as soon as one of the running calls returns (or
    when it holds `max_items`). At low load nothing waits; under load each model server call
    carries many callers, so model servers spend their time computing, not answering RPCs.

    Args:
        max_in_flight: Calls per version running at once before calls are grouped.
        max_items: Most batch items in one joined call.
    """

    def __init__(self, *, max_in_flight: int = 1, max_items: int = 64) -> None:
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._in_flight: dict[tuple[str, int], int] = {}
        self._waiting: dict[tuple[str, int], dict[CoalesceKey, _Group]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.calls = 0
        """Calls sent to model servers."""
        self.members = 0
        """Caller requests those calls carried."""
        self.isolations = 0
        """Joined calls that failed with INVALID_ARGUMENT and were sent again member by member."""

    async def submit(
        self,
        key: CoalesceKey,
        items: int,
        *,
        model: str,
        version: int,
        inputs: Sequence[WireTensor],
        output_names: Sequence[str],
        forwarded: bytes,
        timeout_s: float,
        request_id: str,
        send: Send,
        replicas: int = 1,
        echo_id: str = "",
    ) -> bytes:
        """InferResponse bytes for one caller's request, sent alone or joined with others.

        Args:
            forwarded: The caller's own InferRequest bytes, sent as they are when it is alone.
            send: How to send a call (replica choice, retry, passive health).
            replicas: Replicas of the version: the in-flight limit scales with them.
            echo_id: The request id in the caller's message (its answer carries it; default
                `request_id`).
        """
        mv = (model, version)
        groups = self._waiting.get(mv)
        running = self._in_flight.get(mv, 0)
        if not groups and running < self._max_in_flight * max(replicas, 1):
            # The common case at low load: sent from the caller's own task, as it came.
            self._in_flight[mv] = running + 1
            self.calls += 1
            self.members += 1
            try:
                return await send(forwarded, timeout_s, request_id, 1)
            finally:
                self._release(mv)
        member = _Member(
            inputs,
            items,
            forwarded,
            request_id,
            asyncio.get_running_loop().create_future(),
            echo_id or request_id,
        )
        if groups is None:
            groups = self._waiting[mv] = {}
        group = groups.get(key)
        if group is not None and group.items + items > self._max_items:
            self._start(mv, groups.pop(key))
            group = None
        if group is None:
            group = groups[key] = _Group(model, version, send, output_names)
        group.members.append(member)
        group.items += items
        group.timeout_s = max(group.timeout_s, timeout_s)
        if group.items >= self._max_items:
            self._start(mv, groups.pop(key))
        return await member.future

    def _start(self, mv: tuple[str, int], group: _Group) -> None:
        self._in_flight[mv] = self._in_flight.get(mv, 0) + 1
        task = asyncio.get_running_loop().create_task(self._run(group))
        self._tasks.add(task)

        def finished(done: asyncio.Task[None]) -> None:
            self._tasks.discard(done)
            self._release(mv)

        task.add_done_callback(finished)

    def _release(self, mv: tuple[str, int]) -> None:
        """A call for `mv` ended: the oldest waiting group takes its slot."""
        self._in_flight[mv] -= 1
        groups = self._waiting.get(mv)
        if groups and self._closed:
            for waiting in groups.values():
                for member in waiting.members:
                    member.future.cancel()
            groups.clear()
        if groups:
            oldest = next(iter(groups))
            self._start(mv, groups.pop(oldest))
        if not groups:
            self._waiting.pop(mv, None)

    async def _run(self, group: _Group) -> None:
        members = [m for m in group.members if not m.future.done()]  # callers gone: skip them
        if not members:
            return
        self.calls += 1
        self.members += len(members)
        try:
            if len(members) == 1:
                member = members[0]
                answer = await group.send(member.forwarded, group.timeout_s, member.request_id, 1)
                if not member.future.done():
                    member.future.set_result(answer)
                return
            # A request id of its own: an answer or error of the joined call must not show
            # any member's id to the others.
            joined_id = new_request_id()
            joined = ms.InferRequest(
                model=group.model,
                version=group.version,
                output_names=group.output_names,
                request_id=joined_id,
            )
            total = sum(m.items for m in members)
            for index, first in enumerate(members[0].inputs):
                shape = list(first.shape)
                shape[0] = total
                joined.inputs.add(
                    name=first.name,
                    data_type=first.data_type,
                    shape=shape,
                    raw=b"".join(m.inputs[index].raw for m in members),
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug("coalesced call %s carries %s", joined_id, ",".join(m.request_id for m in members))
            try:
                raw = await group.send(joined.SerializeToString(), group.timeout_s, joined_id, len(members))
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                # Every member was checked, so the model failed on some member's input: each
                # goes again alone, and only the one at fault gets the error.
                self.isolations += 1
                await asyncio.gather(*(self._alone(group, m) for m in members))
                return
            for member, answer in zip(members, _split(raw, members), strict=True):
                if not member.future.done():
                    member.future.set_result(answer)
        except BaseException as exc:  # noqa: BLE001 - every caller gets the failure
            for member in members:
                if not member.future.done():
                    member.future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    @staticmethod
    async def _alone(group: _Group, member: _Member) -> None:
        try:
            answer = await group.send(member.forwarded, group.timeout_s, member.request_id, 1)
        except Exception as exc:  # noqa: BLE001 - this member's own failure
            if not member.future.done():
                member.future.set_exception(exc)
            return
        if not member.future.done():
            member.future.set_result(answer)

    async def aclose(self) -> None:
        """Cancel running calls; callers still waiting in groups are cancelled too."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _split(raw: bytes, members: Sequence[_Member]) -> list[bytes]:
    """Split a joined InferResponse into one InferResponse (bytes) per member, by rows."""
    answer = ms.InferResponse.FromString(raw)
    total = sum(m.items for m in members)
    per_member: list[ms.InferResponse] = [
        ms.InferResponse(
            model=answer.model, version=answer.version, request_id=m.echo_id, timing=answer.timing
        )
        for m in members
    ]
    for output in answer.outputs:
        if not output.shape or output.shape[0] != total or len(output.raw) % total:
            raise ModelExecutionError(
                f"output {output.name!r} of shape {list(output.shape)} cannot be split back "
                f"into the {total} items of a coalesced call"
            )
        row = len(output.raw) // total
        offset = 0
        for member, response in zip(members, per_member, strict=True):
            shape = list(output.shape)
            shape[0] = member.items
            end = offset + member.items * row
            response.outputs.add(
                name=output.name, data_type=output.data_type, shape=shape, raw=output.raw[offset:end]
            )
            offset = end
    return [r.SerializeToString() for r in per_member]
