"""Background tasks with an owner: the one periodic-task helper.

Every background job of the gateway (the change poll, last-used flushes, the access
log's writes, retention, the multiprocess metrics sync, the session janitor) is a
``TaskGroup.every`` of the composition root, which cancels and awaits them all at
shutdown, in one place; the lean server's once-a-second connection sweep is one of its
own. A job that raises is logged by name and runs again at its
next tick: one failed flush must not silently end the job for the process's life.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["TaskGroup"]

log = logging.getLogger("flintproxy.tasks")

Job = Callable[[], Awaitable[object] | object]


class TaskGroup:
    """Owns background tasks: started by ``every``/``spawn``, ended by ``close``."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, name: str, interval_s: float, job: Job, *, now: bool = False) -> None:
        """Run ``job`` (a plain or async callable) every ``interval_s``; first at once
        when ``now``. Its exceptions are logged (never the data it was working on)."""
        self.spawn(name, self._periodic(name, interval_s, job, now))

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Own a long-running coroutine; it is cancelled at ``close``."""
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def close(self) -> None:
        """Cancel every task and wait for each to end (idempotent)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task, result in zip(tasks, await asyncio.gather(*tasks, return_exceptions=True),
                                strict=True):
            if isinstance(result, Exception):
                log.error("background task %s failed: %s", task.get_name(),
                          type(result).__name__)

    @staticmethod
    async def _periodic(name: str, interval_s: float, job: Job, now: bool) -> None:
        if not now:
            await asyncio.sleep(interval_s)
        while True:
            try:
                result = job()
                if isinstance(result, Awaitable):
                    await result
            except Exception:
                log.exception("%s failed; will retry in %g s", name, interval_s)
            await asyncio.sleep(interval_s)
