"""Background tasks with an owner: tracked, failures logged, crashed loops restarted,
cancelled explicitly from `aclose()` (never from `__del__`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["cancel_task", "BackgroundTasks"]

log = logging.getLogger(__name__)


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a task and wait until it has ended; its CancelledError is swallowed, the caller's
    own cancellation is not.

    A cancellation that lands inside a library's I/O can be absorbed there (turned into a
    connection error that a retry loop then handles), so the task is cancelled again until
    it actually ends.
    """
    if task is None or task.done():
        return
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s failed while being cancelled: %r", task.get_name(), task.exception())


class BackgroundTasks:
    """A set of long-running loops owned by one component.

    `spawn(name, factory)` runs `factory()`; if the coroutine crashes it is logged and started
    again after `restart_delay_s`; if it is cancelled it stays stopped.
    """

    def __init__(self, *, restart_delay_s: float = 1.0) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._restart_delay_s = restart_delay_s
        self._closed = False

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        if self._closed:
            raise RuntimeError("Cannot spawn a task after aclose().")

        async def supervised() -> None:
            while True:
                try:
                    await factory()
                    return
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception(
                        "background task %s crashed; restarting in %.1fs", name, self._restart_delay_s
                    )
                    await asyncio.sleep(self._restart_delay_s)

        self._tasks[name] = asyncio.create_task(supervised(), name=name)

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks.values()):
            await cancel_task(task)
        self._tasks.clear()
