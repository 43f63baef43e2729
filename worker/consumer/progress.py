"""Backfill progress: a live line per shard on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from typing import Final

import structlog

from worker.consumer.shard_reader import ShardProgress
from worker.owned_task import OwnedTask

LOG_INTERVAL: Final = 10.0
TTY_INTERVAL: Final = 0.5


class ProgressReporter(OwnedTask):
    """Owns one task that reports progress until the context exits."""

    name = "progress"

    def __init__(
        self,
        progress: Mapping[str, ShardProgress],
        *,
        tty: bool,
        enabled: bool,
    ) -> None:
        super().__init__(enabled)
        self._progress = progress
        self._tty = tty
        self._lines = 0
        self._log = structlog.get_logger("worker.consumer.progress")

    async def _finish(self) -> None:
        self.report()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TTY_INTERVAL if self._tty else LOG_INTERVAL)
            self.report()

    def report(self) -> None:
        shards = sorted(self._progress.values(), key=lambda p: p.shard_id)
        if not self._tty:
            self._log.info(
                "progress",
                shards={
                    p.shard_id: {
                        "records": p.records_read,
                        "millis_behind": p.millis_behind,
                        "caught_up": p.caught_up,
                        "ended": p.ended,
                    }
                    for p in shards
                },
            )
            return
        out = sys.stderr
        if self._lines:
            out.write(f"\x1b[{self._lines}F")
        now = time.monotonic()
        for p in shards:
            rate = p.records_read / max(now - p.started, 1e-6)
            state = "ended" if p.ended else "at tip" if p.caught_up else _behind(p.millis_behind)
            out.write(
                f"\x1b[2K{p.shard_id}  {p.records_read:>10} records  {rate:>8.0f}/s  {state}\n"
            )
        out.flush()
        self._lines = len(shards)


def _behind(millis: int | None) -> str:
    if millis is None:
        return "starting"
    seconds = millis / 1000
    if seconds < 120:
        return f"{seconds:.0f} s behind"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min behind"
    return f"{seconds / 3600:.1f} h behind"
