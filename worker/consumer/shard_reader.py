"""One shard's reader: a prefetching retrieval feeding the batch processor.

The reader owns one background fetch task that reads ahead into a bounded queue while the
current batch is handled. A polling fetcher asks for the next batch only once the queue has
room for it, so a shard holds at most ``prefetch`` batches waiting and the one being
handled: memory stays flat under any backlog. What fetches is
a ``Retrieval`` (``worker.consumer.retrieval``): GetRecords polling by default, or
SubscribeToShard with enhanced fan-out; the reader does not know which. Each delivers the
shard's records in order, in batches, with Kinesis' ``MillisBehindLatest``, and says when
the shard has ended.

After each batch's handlers all return, the reader writes the fenced checkpoint. After the
last batch of a shard read to its end the checkpoint becomes ``SHARD_END``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import structlog

from worker import keys
from worker.backoff import Backoff
from worker.consumer.checkpoints import Checkpoints, LeaseLost
from worker.consumer.kinesis import KinesisClient
from worker.consumer.leases import Lease
from worker.consumer.pipeline import BatchProcessor
from worker.consumer.polling import Polling
from worker.consumer.positions import StartPosition
from worker.consumer.retrieval import Fetched, Retrieval, ShardFeed


@dataclass(slots=True)
class ShardProgress:
    """What the supervisor and the progress display know of a reader."""

    shard_id: str
    records_read: int = 0
    batches: int = 0
    dead_lettered: int = 0
    millis_behind: int | None = None
    caught_up: bool = False
    ended: bool = False
    last_sequence: str | None = None
    started: float = field(default_factory=time.monotonic)
    waiting_since: float | None = None
    """When the oldest batch not yet handled was first taken up (monotonic): kept across
    failed attempts and reader restarts, None once it is handled."""
    progressed: float = field(default_factory=time.monotonic)
    """When the shard last made progress: a batch handled, or found nothing waiting."""
    kinesis_ok: float | None = None
    """When Kinesis last answered this reader (monotonic)."""
    reading: bool = False
    """A reader of this process is running on the shard."""
    failed_at: float | None = None
    """When a reader of this shard last ended with a failure (monotonic)."""

    def stuck_since(self, now: float) -> float | None:
        """When the batch this shard is stuck on was first taken up, if it is ours to
        read: a reader runs, or one failed within ``RESUME_WINDOW`` and is restarting."""
        restarting = self.failed_at is not None and now - self.failed_at <= RESUME_WINDOW
        return self.waiting_since if self.reading or restarting else None


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_STOPPED: Final = object()
RESUME_WINDOW: Final = 60.0
"""A reader starting within this many seconds of a failed one on the same shard is a
restart: the batch the failed one could not handle still counts as waiting (health)."""


class ShardReader:
    """Reads one shard until it ends, its lease is lost, or it is told to stop."""

    def __init__(
        self,
        *,
        kinesis: KinesisClient,
        stream: str,
        lease: Lease,
        start: StartPosition,
        stored: str | None,
        checkpoints: Checkpoints,
        processor: BatchProcessor,
        batch_limit: int,
        idle_interval: float,
        prefetch: int,
        progress: ShardProgress | None = None,
        backoff: Backoff | None = None,
        retrieval: Retrieval | None = None,
    ) -> None:
        self.shard_id = lease.shard_id
        self.lease = lease
        self.progress = progress or ShardProgress(lease.shard_id)
        self._kinesis = kinesis
        self._stream = stream
        self._start = start
        self._stored = stored
        """The checkpoint in Redis as this reader knows it: read at start, then written."""
        self._checkpoints = checkpoints
        self._processor = processor
        self._limit = batch_limit
        self._idle = idle_interval
        self._tip_ttl = max(5.0, 3 * idle_interval)
        self._prefetch = prefetch
        self._backoff = backoff or Backoff(base=0.2, cap=10.0)
        self._retrieval: Retrieval = retrieval or Polling()
        self._stopping = asyncio.Event()
        self._taken = asyncio.Event()
        """Set whenever the reader takes a batch from its read-ahead (room for another)."""
        self._metrics = processor.metrics
        self._log = structlog.get_logger("worker.consumer.shard_reader").bind(
            shard_id=self.shard_id
        )

    def stop(self) -> None:
        """Stop reading; the batch being handled is finished and checkpointed."""
        self._stopping.set()

    async def run(self) -> bool:
        """Read until the shard ends (True) or the reader is stopped (False)."""
        structlog.contextvars.bind_contextvars(shard_id=self.shard_id)
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self._prefetch)
        fetcher = asyncio.create_task(self._fetch(queue), name=f"fetch-{self.shard_id}")
        now = time.monotonic()
        failed_at = self.progress.failed_at
        if failed_at is None or now - failed_at > RESUME_WINDOW:
            # Not a restart after a failure (the shard came back later, perhaps from
            # another replica): what was waiting then says nothing about this reader.
            self.progress.waiting_since = None
        self.progress.reading = True
        self.progress.progressed = now
        failed = True
        try:
            while True:
                item = await self._next(queue)
                if item is _STOPPED or self._stopping.is_set():
                    failed = False
                    return False
                if isinstance(item, _Failed):
                    raise item.error
                assert isinstance(item, Fetched)
                await self._handle(item)
                if item.ended:
                    await self._checkpoint(keys.SHARD_END)
                    self.progress.ended = True
                    self._log.info("shard_ended", records_read=self.progress.records_read)
                    failed = False
                    return True
        finally:
            self.progress.reading = False
            if failed:
                self.progress.failed_at = time.monotonic()
            else:
                self.progress.waiting_since = None
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)

    async def _next(self, queue: asyncio.Queue[object]) -> object:
        """The next fetched item, or ``_STOPPED`` as soon as a stop is asked for (the fetcher
        may be in a slow call or a backoff sleep; it is cancelled on the way out)."""
        if not queue.empty():
            self._taken.set()
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (getter, stopper):
                waiter.cancel()
            await asyncio.gather(getter, stopper, return_exceptions=True)
        if getter.done() and not getter.cancelled():
            self._taken.set()
            return getter.result()
        return _STOPPED

    async def _handle(self, fetched: Fetched) -> None:
        progress = self.progress
        metrics, shard = self._metrics, self.shard_id
        if fetched.records:
            structlog.contextvars.bind_contextvars(
                batch_first_sequence=fetched.records[0].sequence_number,
                batch_last_sequence=fetched.records[-1].sequence_number,
            )
            if progress.waiting_since is None:
                progress.waiting_since = time.monotonic()
            outcome = await self._processor.process(self.shard_id, fetched.records)
            last = fetched.records[-1].sequence_number
            await self._checkpoint(last)
            progress.waiting_since = None
            progress.last_sequence = last
            progress.records_read += len(fetched.records)
            progress.dead_lettered += outcome.dead_lettered
            progress.batches += 1
            metrics.records_read.labels(shard=shard).inc(len(fetched.records))
            metrics.checkpoint_writes.labels(shard=shard).inc()
            arrival = fetched.records[-1].arrival
            if arrival is not None:
                age = max(0.0, datetime.now(UTC).timestamp() - arrival.timestamp())
                metrics.iterator_age.labels(shard=shard).set(age)
        progress.progressed = time.monotonic()
        progress.millis_behind = fetched.millis_behind
        if fetched.millis_behind is not None:
            metrics.millis_behind.labels(shard=shard).set(fetched.millis_behind)
        was_at_tip = progress.caught_up
        progress.caught_up = not fetched.millis_behind and len(fetched.records) < self._limit
        if progress.caught_up or was_at_tip:
            await self._checkpoints.mark_tip(self.shard_id, progress.caught_up, self._tip_ttl)

    async def _checkpoint(self, value: str) -> None:
        try:
            await self._checkpoints.write(self.lease, value, previous=self._stored)
        except LeaseLost:
            self._metrics.fencing_refusals.inc()
            raise
        self._stored = value

    async def _fetch(self, queue: asyncio.Queue[object]) -> None:
        """Run the retrieval into ``queue``; then ``_STOPPED`` unless the shard ended, or
        ``_Failed`` with what it raised."""
        ended = False

        async def deliver(fetched: Fetched) -> None:
            nonlocal ended
            await queue.put(fetched)
            ended = fetched.ended

        async def room() -> None:
            # One fetcher per queue: room found here is still there when it delivers.
            while queue.full():
                self._taken.clear()
                await self._taken.wait()

        feed = ShardFeed(
            kinesis=self._kinesis,
            stream=self._stream,
            shard_id=self.shard_id,
            start=self._start,
            batch_limit=self._limit,
            idle_interval=self._idle,
            stopping=self._stopping,
            metrics=self._metrics,
            backoff=self._backoff,
            answered=self._answered,
            log=self._log,
            room=room,
        )
        try:
            await self._retrieval.fetch(feed, deliver)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(_Failed(exc))
            return
        if not ended:
            await queue.put(_STOPPED)

    def _answered(self) -> None:
        self.progress.kinesis_ok = time.monotonic()
