"""A handler for in-process tests of the worker's time limits on handlers.

Named by import path (``stubborn:create``). It records like ``recording`` does and is a
``ShardListener``. Module-level switches, set by the test before the worker starts:

- ``swallow``: ``handle`` ignores every cancellation (a handler catching
  ``CancelledError`` and carrying on) until ``released`` is set;
- ``hang_on_assign`` / ``hang_on_revoke``: the hook waits an hour (cancellable).

``entered`` is set when a batch starts, ``left`` when ``handle`` returns, ``assigning``
when ``on_shards_assigned`` is called; ``swallowed`` counts the cancellations it ignored.

``stubborn:swallowing`` is the same handler with ``swallow`` on and never released, for a
worker process; it touches the file named by ``STUBBORN_ENTERED`` when a batch starts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recording import RecordingHandler

from worker.handlers.base import Batch, HandlerContext


@dataclass
class Switches:
    swallow: bool = False
    hang_on_assign: bool = False
    hang_on_revoke: bool = False
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    left: asyncio.Event = field(default_factory=asyncio.Event)
    assigning: asyncio.Event = field(default_factory=asyncio.Event)
    swallowed: int = 0


switches = Switches()


def reset() -> Switches:
    """Fresh switches (their events on the running loop)."""
    global switches
    switches = Switches()
    return switches


class StubbornHandler(RecordingHandler):
    name = "stubborn"

    async def handle(self, batch: Batch) -> None:
        switches.entered.set()
        if marker := os.environ.get("STUBBORN_ENTERED"):
            Path(marker).touch()  # noqa: ASYNC240 - once, a test's marker
        if switches.swallow:
            while not switches.released.is_set():
                try:
                    await switches.released.wait()
                except asyncio.CancelledError:
                    switches.swallowed += 1
            switches.left.set()
            return
        await super().handle(batch)

    async def on_shards_assigned(self, shards: Sequence[str]) -> None:
        switches.assigning.set()
        if switches.hang_on_assign:
            await asyncio.sleep(3600)

    async def on_shards_revoked(self, shards: Sequence[str], *, ended: bool) -> None:
        if switches.hang_on_revoke:
            await asyncio.sleep(3600)


def create(context: HandlerContext[Any]) -> StubbornHandler:
    return StubbornHandler(context)


def swallowing(context: HandlerContext[Any]) -> StubbornHandler:
    """The handler with every cancellation ignored, for good (see the module's docstring)."""
    switches.swallow = True
    return StubbornHandler(context)
