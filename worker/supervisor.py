"""The supervisor: discovers shards, holds their leases, and owns one reader task per shard.

Ordering guarantee: a child shard (after a split or merge) starts only when every parent
is at ``SHARD_END`` or no longer exists (trimmed), so per partition key nothing is read
out of order across a reshard. Discovery runs every ``discovery_interval`` and at once
when a shard ends, so children start within a second of their last parent ending.

Reader failures are logged and the reader is restarted with backoff from its last
checkpoint; the process keeps running. ``stop()`` stops reading, lets each in-flight
batch finish (bounded by ``shutdown_timeout``), checkpoints, and releases the leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

from worker import keys
from worker.backoff import Backoff
from worker.checkpoints import Checkpoints, LeaseLost
from worker.kinesis import KinesisClient, ShardInfo, is_retriable, list_shards
from worker.leases import Lease, LeaseManager
from worker.pipeline import BatchProcessor
from worker.settings import InitialPosition, Settings
from worker.shard_reader import LATEST, TRIM_HORIZON, ShardProgress, ShardReader, StartPosition


@dataclass(slots=True)
class _Running:
    reader: ShardReader
    task: asyncio.Task[bool]


class Supervisor:
    def __init__(
        self,
        *,
        settings: Settings,
        kinesis: KinesisClient,
        leases: LeaseManager,
        checkpoints: Checkpoints,
        processor: BatchProcessor,
        from_start: bool = False,
        at_timestamp: datetime | None = None,
        until_caught_up: bool = False,
        reader_factory: Callable[..., ShardReader] = ShardReader,
    ) -> None:
        self._settings = settings
        self._stream = settings.stream_name
        self._kinesis = kinesis
        self._leases = leases
        self._checkpoints = checkpoints
        self._processor = processor
        self._until_caught_up = until_caught_up
        self._reader_factory = reader_factory
        self._ignore_checkpoints = from_start or at_timestamp is not None
        self._initial = self._initial_position(from_start, at_timestamp)
        self._fresh: set[str] = set()
        """Shards whose checkpoint this run wrote or trusts (all, unless backfilling)."""
        self._running: dict[str, _Running] = {}
        self._ended: set[str] = set()
        self._restart_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._shards: dict[str, ShardInfo] = {}
        self.progress: dict[str, ShardProgress] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._backoff = Backoff(base=0.5, cap=30.0)
        self._log = structlog.get_logger("worker.supervisor")
        self.caught_up = False

    def _initial_position(self, from_start: bool, at: datetime | None) -> StartPosition:
        if from_start:
            return TRIM_HORIZON
        if at is not None:
            return StartPosition("AT_TIMESTAMP", timestamp=at)
        settings = self._settings
        if settings.initial_position is InitialPosition.TRIM_HORIZON:
            return TRIM_HORIZON
        if settings.initial_position is InitialPosition.AT_TIMESTAMP:
            return StartPosition("AT_TIMESTAMP", timestamp=settings.initial_timestamp)
        return LATEST

    def stop(self) -> None:
        """Ask for a graceful stop (idempotent)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Run until stopped (or, with ``until_caught_up``, until every shard is at its tip)."""
        renewer = asyncio.create_task(self._renew_leases(), name="lease-renewer")
        try:
            while not self._stopping.is_set():
                await self._reap()
                try:
                    await self._reconcile()
                except Exception as exc:
                    if not is_retriable(exc):
                        raise
                    self._log.warning("discovery_failed", error=f"{type(exc).__name__}: {exc}")
                if self._until_caught_up and self.all_caught_up():
                    self.caught_up = True
                    self._log.info("caught_up", shards=len(self.progress))
                    break
                self._wake.clear()
                interval = 0.2 if self._until_caught_up else self._settings.discovery_interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._next_wake(interval))
        finally:
            await self._shutdown()
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)

    def _next_wake(self, interval: float) -> float:
        now = time.monotonic()
        pending = [at - now for at in self._restart_at.values() if at > now]
        return max(0.05, min([interval, *pending]))

    async def _reconcile(self) -> None:
        shards = await list_shards(self._kinesis, self._stream)
        self._shards = {shard.shard_id: shard for shard in shards}
        checkpoints = await self._checkpoints.all()
        now = time.monotonic()
        for shard in shards:
            sid = shard.shard_id
            if sid in self._running or self._restart_at.get(sid, 0) > now:
                continue
            checkpoint = self._checkpoint(sid, checkpoints)
            if checkpoint == keys.SHARD_END:
                self._ended.add(sid)
                continue
            if not all(self._parent_done(p, checkpoints) for p in shard.parents):
                continue
            lease = await self._leases.acquire(sid)
            if lease is None:
                continue
            self._restart_at.pop(sid, None)
            self._start_reader(shard, lease, checkpoint)

    def _checkpoint(self, shard_id: str, checkpoints: dict[str, str]) -> str | None:
        if self._ignore_checkpoints and shard_id not in self._fresh:
            return None
        return checkpoints.get(shard_id)

    def _parent_done(self, parent: str, checkpoints: dict[str, str]) -> bool:
        if parent not in self._shards:
            return True  # trimmed: past retention, nothing left to read
        return parent in self._ended or self._checkpoint(parent, checkpoints) == keys.SHARD_END

    def _start_reader(self, shard: ShardInfo, lease: Lease, checkpoint: str | None) -> None:
        sid = shard.shard_id
        if checkpoint:
            start = StartPosition.after(checkpoint)
        elif any(p in self._shards for p in shard.parents):
            start = TRIM_HORIZON  # a child of a shard we read: from its first record
        else:
            start = self._initial
        progress = self.progress.setdefault(sid, ShardProgress(sid))
        progress.caught_up = False
        settings = self._settings
        reader = self._reader_factory(
            kinesis=self._kinesis,
            stream=self._stream,
            lease=lease,
            start=start,
            checkpoints=self._checkpoints,
            processor=self._processor,
            batch_limit=settings.batch_limit,
            idle_interval=settings.idle_interval,
            prefetch=settings.prefetch_batches,
            progress=progress,
        )
        self._fresh.add(sid)
        task = asyncio.create_task(reader.run(), name=f"shard-{sid}")
        task.add_done_callback(lambda _: self._wake.set())
        self._running[sid] = _Running(reader, task)
        self._log.info(
            "shard_started",
            shard_id=sid,
            start=start.iterator_type,
            sequence=start.sequence,
            owner=lease.owner,
            lease_token=lease.token,
        )

    async def _reap(self) -> None:
        """Collect finished readers: ended shards, lost leases, failures (restart later)."""
        for sid, running in list(self._running.items()):
            if not running.task.done():
                continue
            del self._running[sid]
            try:
                ended = running.task.result()
            except LeaseLost as exc:
                self._log.warning("lease_lost", shard_id=sid, error=str(exc))
                continue
            except asyncio.CancelledError:
                continue
            except Exception as exc:
                failures = self._failures.get(sid, 0) + 1
                self._failures[sid] = failures
                delay = self._backoff.delay(failures)
                self._restart_at[sid] = time.monotonic() + delay
                self._log.error(
                    "shard_reader_failed",
                    shard_id=sid,
                    failures=failures,
                    restart_in=round(delay, 2),
                    retriable=is_retriable(exc) or getattr(exc, "retriable", False),
                    error=f"{type(exc).__name__}: {exc}",
                )
                await self._leases.release(running.reader.lease)
                continue
            self._failures.pop(sid, None)
            if ended:
                self._ended.add(sid)
            await self._leases.release(running.reader.lease)

    def all_caught_up(self) -> bool:
        """True when every shard is ended, or read by us and at its tip."""
        if self._restart_at and max(self._restart_at.values()) > time.monotonic():
            return False
        for sid in self._shards:
            if sid in self._ended:
                continue
            running = self._running.get(sid)
            if running is None or not running.reader.progress.caught_up:
                return False
        return bool(self._shards)

    async def _renew_leases(self) -> None:
        interval = self._settings.lease_ttl / 3
        while True:
            await asyncio.sleep(interval)
            for sid, running in list(self._running.items()):
                try:
                    kept = await self._leases.renew(running.reader.lease)
                except Exception as exc:
                    self._log.warning("lease_renew_failed", shard_id=sid, error=str(exc))
                    continue
                if not kept:
                    self._log.warning("lease_lost", shard_id=sid)
                    running.reader.stop()

    async def _shutdown(self) -> None:
        running = list(self._running.values())
        for item in running:
            item.reader.stop()
        if running:
            _done, pending = await asyncio.wait(
                [item.task for item in running], timeout=self._settings.shutdown_timeout
            )
            for task in pending:
                task.cancel()
            if pending:
                self._log.warning("shutdown_timeout", abandoned=len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        for item in running:
            if item.task.done() and not item.task.cancelled() and item.task.exception():
                self._log.error(
                    "shard_reader_failed",
                    shard_id=item.reader.shard_id,
                    error=repr(item.task.exception()),
                )
            try:
                await self._leases.release(item.reader.lease)
            except Exception as exc:
                self._log.warning(
                    "lease_release_failed", shard_id=item.reader.shard_id, error=str(exc)
                )
        self._running.clear()
