"""The built-in ``log`` handler: one log line per batch with counts per event kind."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

import structlog

from worker.handlers.base import Batch, HandlerContext, Plugin


class LogHandler:
    """Logs how many events of each kind each batch held. Stateless, so idempotent."""

    name = "log"

    def __init__(self) -> None:
        self._log = structlog.get_logger("worker.handlers.log")
        self.totals: Counter[str] = Counter()

    async def handle(self, batch: Batch) -> None:
        # Counted by kind, then named: one C-level pass over the batch's kinds (a generator
        # reading each event's kind's value costs about ten times as much).
        by_kind = Counter(batch.kinds)
        counts = Counter({kind.value: count for kind, count in by_kind.items()})
        self.totals.update(counts)
        self._log.info("batch", shard_id=batch.shard_id, events=len(batch), kinds=dict(counts))

    async def close(self) -> None:
        self._log.info("totals", kinds=dict(self.totals))


def create(_: HandlerContext[Any]) -> LogHandler:
    return LogHandler()


plugin: Final = Plugin(create)
"""The ``log`` handler (no settings)."""
