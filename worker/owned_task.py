"""A background task owned by an ``async with`` block: started on entry, cancelled and
awaited on exit, so no task outlives its owner.

The exit does not trust one cancellation to stop the task: a library can lose it (asyncio
client libraries have been known to swallow a cancellation that lands while their own
timeout fires; under heavy load a tick round's Redis calls were seen to lose one). So the
task is cancelled again every
``CANCEL_AGAIN_AFTER`` seconds until it ends, and after ``STOP_PATIENCE`` seconds it is
left behind with a log line (``background_task_abandoned``) rather than holding up the
owner's exit for good.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Final

import structlog

CANCEL_AGAIN_AFTER: Final = 0.5
"""Seconds between cancellations of a task that has not ended yet."""
STOP_PATIENCE: Final = 5.0
"""Seconds a task gets, after its first cancellation, before it is left behind."""


async def stop_task(task: asyncio.Task[Any], name: str, patience: float | None = None) -> bool:
    """Cancel ``task`` (again every ``CANCEL_AGAIN_AFTER`` s) until it ends or ``patience``
    (default ``STOP_PATIENCE``) runs out; True when it ended. Its result or error is left
    for its done callbacks."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (STOP_PATIENCE if patience is None else patience)
    cancellations = 0
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            structlog.get_logger("worker.tasks").error(
                "background_task_abandoned", task=name, cancellations=cancellations
            )
            return False
        task.cancel()
        cancellations += 1
        await asyncio.wait({task}, timeout=min(CANCEL_AGAIN_AFTER, remaining))
    if cancellations > 1:
        structlog.get_logger("worker.tasks").warning(
            "background_task_ignored_cancellation", task=name, cancellations=cancellations
        )
    return True


class OwnedTask:
    """Subclasses implement ``_run``; ``enabled`` says whether to start it at all."""

    name = "task"

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    async def _finish(self) -> None:
        """Called after the task has stopped (only if it was started)."""

    async def __aenter__(self) -> OwnedTask:
        if self._enabled:
            self._task = asyncio.create_task(self._run(), name=self.name)
            self._task.add_done_callback(self._report)
        return self

    def _report(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            structlog.get_logger("worker.tasks").error(
                "background_task_failed", task=self.name, error=repr(task.exception())
            )

    async def __aexit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            await stop_task(self._task, self.name)
            await self._finish()
