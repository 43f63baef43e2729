"""A handler for tests: records every event it handles in Redis, in handling order.

Named by import path (``recording:create``) so worker subprocesses find it with
``PYTHONPATH=tests``. ``RECORDING_DELAY`` (seconds per batch) slows it down;
``RECORDING_FAIL_FIRST=N`` makes its first N calls (per stream) fail as if its store were
down; an event whose ``sim_unique_name`` is ``poison`` makes it raise (unless
``RECORDING_ACCEPT_POISON=1``: the handler once fixed), ``cancel`` makes it raise
``CancelledError``. With ``RECORDING_STOP_DIR``, a process finding a file named by its pid
there when a batch starts removes it and stops itself (SIGSTOP) in the middle of that batch,
until it gets SIGCONT.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from worker.errors import RetriableError
from worker.handlers.base import Batch, HandlerContext

POISON = "poison"
CANCEL = "cancel"
_failures_left: dict[str, int] = {}


def seen_key(key_prefix: str) -> str:
    return f"{key_prefix}:test:seen"


class RecordingHandler:
    name = "recording"

    def __init__(self, context: HandlerContext[Any]) -> None:
        self._redis = context.redis
        self._key = seen_key(context.key_prefix)
        self._delay = float(os.environ.get("RECORDING_DELAY", "0"))
        self._accept_poison = os.environ.get("RECORDING_ACCEPT_POISON") == "1"
        stop_dir = os.environ.get("RECORDING_STOP_DIR")
        self._stop_flag = Path(stop_dir) / str(os.getpid()) if stop_dir else None
        _failures_left.setdefault(self._key, int(os.environ.get("RECORDING_FAIL_FIRST", "0")))

    async def handle(self, batch: Batch) -> None:
        if _failures_left.get(self._key, 0) > 0:
            _failures_left[self._key] -= 1
            raise RetriableError("recording store unavailable (injected)")
        for event in batch.events:
            if event.data.sim_unique_name == POISON and not self._accept_poison:
                raise ValueError("poison record")
            if event.data.sim_unique_name == CANCEL:
                raise asyncio.CancelledError("a future the handler awaited was cancelled")
        if self._stop_flag is not None and self._stop_flag.exists():
            self._stop_flag.unlink()
            os.kill(os.getpid(), signal.SIGSTOP)
        if self._delay:
            await asyncio.sleep(self._delay)
        entries = []
        for event in batch.events:
            assert event.meta is not None
            entries.append(f"{event.meta.shard_id}|{event.meta.sequence_number}|{event.event_sid}")
        await self._redis.rpush(self._key, *entries)  # type: ignore[misc]

    async def close(self) -> None:
        return None


def create(context: HandlerContext) -> RecordingHandler:
    return RecordingHandler(context)


async def seen(redis_url: str, key_prefix: str) -> list[tuple[str, str, str]]:
    """(shard id, sequence number, event sid) of every handled event, in handling order."""
    client = Redis.from_url(redis_url)
    try:
        raw = await client.lrange(seen_key(key_prefix), 0, -1)  # type: ignore[misc]
    finally:
        await client.aclose()
    return [tuple(item.decode().split("|")) for item in raw]  # type: ignore[misc]


async def wait_handled(redis_url: str, key_prefix: str, count: int, within: float = 60) -> int:
    """Poll until at least ``count`` events were handled; fail after ``within`` seconds."""
    for _ in range(int(within / 0.05)):
        handled = len(await seen(redis_url, key_prefix))
        if handled >= count:
            return handled
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(await seen(redis_url, key_prefix))} of {count} handled")


class HangingTickHandler(RecordingHandler):
    """Records as ``RecordingHandler``; its ``tick`` notes in Redis that it started
    (``ticked_key``), then never returns."""

    async def tick(self) -> None:
        await self._redis.set(ticked_key(self._key), "1")
        await asyncio.Event().wait()


def ticked_key(seen: str) -> str:
    return f"{seen}:ticked"


def create_hanging_tick(context: HandlerContext[Any]) -> HangingTickHandler:
    return HangingTickHandler(context)


LEFT_BY_FLUSH = "1 alert transition(s) still in the outbox"


class UnfinishedFlushHandler(RecordingHandler):
    """Records as ``RecordingHandler``; its ``flush`` says it left ``LEFT_BY_FLUSH``, as the
    alert handlers' does while their outbox still holds transitions."""

    async def flush(self) -> str | None:
        return LEFT_BY_FLUSH


def create_unfinished_flush(context: HandlerContext[Any]) -> UnfinishedFlushHandler:
    return UnfinishedFlushHandler(context)
