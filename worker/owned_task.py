"""A background task owned by an ``async with`` block: started on entry, cancelled and
awaited on exit, so no task outlives its owner."""

from __future__ import annotations

import asyncio
from types import TracebackType

import structlog


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
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            await self._finish()
