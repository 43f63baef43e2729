"""A recording handler (``recording.py``) that a test can hold in the middle of a batch.

Named by import path (``holding:create``) so worker subprocesses find it with
``PYTHONPATH=tests``. With ``HOLDING_DIR``, a process finding a file named by its pid there
when a batch starts marks that it holds the batch (``<pid>.<shard>.held``) and waits until
the file is removed, then records the batch like ``recording`` does: a legitimately slow
batch (within the handler timeout), for as long as the test wants.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from recording import RecordingHandler

from worker.handlers.base import Batch, HandlerContext


class HoldingHandler(RecordingHandler):
    def __init__(self, context: HandlerContext[Any]) -> None:
        super().__init__(context)
        folder = os.environ.get("HOLDING_DIR")
        self._folder = Path(folder) if folder else None

    async def handle(self, batch: Batch) -> None:
        if self._folder is not None:
            flag = self._folder / str(os.getpid())
            if flag.exists():
                (self._folder / f"{os.getpid()}.{batch.shard_id}.held").touch()
                while flag.exists():  # noqa: ASYNC110  # removed by the test process: polled
                    await asyncio.sleep(0.05)
        await super().handle(batch)


def create(context: HandlerContext[Any]) -> HoldingHandler:
    return HoldingHandler(context)
