"""Bidirectional streams of independent requests: each answered as soon as it is done.

Usage (a servicer's stream method)::

    async def PredictStream(self, requests, context):
        async for answer in answer_each(requests, self._answer_one):
            yield answer

`answer_one` turns one request into one response message, errors included (a stream of
independent calls reports each call's failure in its own response; the stream goes on).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

__all__ = ["answer_each"]

Request = TypeVar("Request")
Response = TypeVar("Response")


async def answer_each(
    requests: AsyncIterator[Request], answer_one: Callable[[Request], Awaitable[Response]]
) -> AsyncIterator[Response]:
    """Run `answer_one` on every request of the stream concurrently; yield the answers as
    they complete (not in request order: callers match them by id).

    The stream ends when the requests have ended and every answer is out. When the caller
    goes away (the generator is closed), the reader and every running request are cancelled.
    A failure to read the requests (an undecodable message) ends the stream with that error.
    """
    done: asyncio.Queue[Response | None] = asyncio.Queue()
    pending: set[asyncio.Task[None]] = set()

    async def run(item: Request) -> None:
        await done.put(await answer_one(item))

    async def read_all() -> None:
        try:
            async for message in requests:
                task = asyncio.create_task(run(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            while pending:
                await asyncio.gather(*list(pending))
        finally:
            await done.put(None)

    reader = asyncio.create_task(read_all())
    try:
        while (out := await done.get()) is not None:
            yield out
        await reader
    finally:
        reader.cancel()
        for task in list(pending):
            task.cancel()
