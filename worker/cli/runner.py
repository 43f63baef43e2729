"""Run a command's coroutine to the end, with a bounded exit.

``asyncio.run`` cancels the tasks still pending when the coroutine returns and then waits
for them without a limit. The worker's own shutdown is bounded: a shard reader stuck in a
handler that ignores its cancellation is abandoned once its leases are released (see
``docs/architecture.md``, Shutdown). Waiting for it at exit would keep the process alive
until the orchestrator kills it, so here leftovers get ``EXIT_GRACE`` seconds after their
cancellation, and the loop is closed without them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Final, TypeVar

import structlog

T = TypeVar("T")

EXIT_GRACE: Final = 1.0
"""Seconds the tasks left at exit get to end after their cancellation."""
LAST_TICK_INCOMPLETE: Final = 3
"""Exit status of a run that ended caught up but whose last tick or flush left work undone
(``last_tick_incomplete``): a call failed or timed out, a flush said what it left (alerts
still in the outbox), or a stop cut the last tick short. That work waits for a later run of
the group."""


def run_until_done(main: Coroutine[Any, Any, T], grace: float = EXIT_GRACE) -> T:
    """``asyncio.run(main)``, but tasks left when it ends get ``grace`` seconds to stop."""
    loop = asyncio.new_event_loop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftovers(loop, grace)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop, grace: float) -> None:
    leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not leftovers:
        return
    for task in leftovers:
        task.cancel()
    done, pending = loop.run_until_complete(asyncio.wait(leftovers, timeout=grace))
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            structlog.get_logger("worker").warning(
                "task_failed_at_exit", task=task.get_name(), error=repr(task.exception())
            )
    if pending:
        # Dropped with the loop (the shutdown released their leases already).
        structlog.get_logger("worker").warning(
            "tasks_left_at_exit", tasks=sorted(task.get_name() for task in pending)
        )
