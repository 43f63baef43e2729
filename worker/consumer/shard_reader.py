"""One shard's reader: a prefetching GetRecords loop feeding the batch processor.

The reader owns one background fetch task that reads ahead into a bounded queue (so
memory stays flat under any backlog) while the current batch is handled. It reads again
at once while the shard is behind (``MillisBehindLatest > 0`` or a full batch), waits
``idle_interval`` when caught up, and never calls GetRecords more than 5 times a second.
Throttling, timeouts and connection errors are retried with capped, jittered backoff;
an expired iterator is replaced AFTER_SEQUENCE_NUMBER of the last record fetched (all
fetched records are handled before anything later, so nothing is skipped or repeated).

After each batch's handlers all return, the reader writes the fenced checkpoint. When
GetRecords returns no NextShardIterator the shard is finished: after the last batch the
checkpoint becomes ``SHARD_END``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import structlog

from worker import keys
from worker.backoff import Backoff
from worker.consumer.checkpoints import Checkpoints, LeaseLost
from worker.consumer.kinesis import (
    EXPIRED_ITERATOR,
    KinesisClient,
    error_code,
    is_retriable,
    list_shards,
)
from worker.consumer.leases import Lease
from worker.consumer.pipeline import BatchProcessor, RawRecord
from worker.consumer.positions import LATEST_MARGIN, StartPosition
from worker.errors import RetriableError

MIN_CALL_INTERVAL: Final = 0.2
"""Kinesis allows 5 GetRecords calls per second per shard."""
MAX_FETCH_FAILURES: Final = 8
THROTTLED: Final = frozenset({"ProvisionedThroughputExceededException", "LimitExceededException"})


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


@dataclass(frozen=True, slots=True)
class _Fetched:
    records: list[RawRecord]
    millis_behind: int | None
    ended: bool


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_STOPPED: Final = object()


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
        self._stopping = asyncio.Event()
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
        self.progress.reading = True
        self.progress.progressed = time.monotonic()
        failed = True
        try:
            while True:
                item = await self._next(queue)
                if item is _STOPPED or self._stopping.is_set():
                    failed = False
                    return False
                if isinstance(item, _Failed):
                    raise item.error
                assert isinstance(item, _Fetched)
                await self._handle(item)
                if item.ended:
                    await self._checkpoint(keys.SHARD_END)
                    self.progress.ended = True
                    self._log.info("shard_ended", records_read=self.progress.records_read)
                    failed = False
                    return True
        finally:
            self.progress.reading = False
            if not failed:
                self.progress.waiting_since = None
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)

    async def _next(self, queue: asyncio.Queue[object]) -> object:
        """The next fetched item, or ``_STOPPED`` as soon as a stop is asked for (the fetcher
        may be in a slow call or a backoff sleep; it is cancelled on the way out)."""
        if not queue.empty():
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
            return getter.result()
        return _STOPPED

    async def _handle(self, fetched: _Fetched) -> None:
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
        try:
            await self._fetch_loop(queue)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await queue.put(_Failed(exc))

    async def _fetch_loop(self, queue: asyncio.Queue[object]) -> None:
        start = self._start
        iterator = await self._iterator(start)
        if start.iterator_type == "LATEST":
            # Should this iterator expire before a record arrives, start again from when it
            # was taken (with a margin for clock skew), never from a newer LATEST.
            start = StartPosition("AT_TIMESTAMP", timestamp=datetime.now(UTC) - LATEST_MARGIN)
        last_call = 0.0
        failures = 0
        while not self._stopping.is_set():
            pause = MIN_CALL_INTERVAL - (time.monotonic() - last_call)
            if pause > 0:
                await asyncio.sleep(pause)
            last_call = time.monotonic()
            self._metrics.get_records.labels(shard=self.shard_id).inc()
            try:
                response = await self._kinesis.get_records(
                    ShardIterator=iterator, Limit=self._limit
                )
            except Exception as exc:
                if error_code(exc) == EXPIRED_ITERATOR:
                    self._metrics.iterators_expired.labels(shard=self.shard_id).inc()
                    self._log.info("iterator_expired", restart=start.iterator_type)
                    iterator = await self._iterator(start)
                    continue
                if not is_retriable(exc):
                    raise
                if error_code(exc) in THROTTLED:
                    self._metrics.get_records_throttled.labels(shard=self.shard_id).inc()
                self._metrics.get_records_retries.labels(shard=self.shard_id).inc()
                failures += 1
                if failures > MAX_FETCH_FAILURES:
                    raise RetriableError(
                        f"GetRecords failed {failures} times in a row: {exc}"
                    ) from exc
                await self._retry_pause("get_records_retry", failures, exc)
                continue
            failures = 0
            self.progress.kinesis_ok = time.monotonic()
            records = [
                RawRecord(
                    data=r["Data"],
                    sequence_number=r["SequenceNumber"],
                    partition_key=r.get("PartitionKey", ""),
                    arrival=r.get("ApproximateArrivalTimestamp"),
                )
                for r in response.get("Records", [])
            ]
            if records:
                start = StartPosition.after(records[-1].sequence_number)
            behind = response.get("MillisBehindLatest")
            next_iterator = response.get("NextShardIterator")
            if next_iterator is None:
                await self._confirm_closed()
            await queue.put(_Fetched(records, behind, ended=next_iterator is None))
            if next_iterator is None:
                return
            iterator = next_iterator
            if not behind and len(records) < self._limit:
                await self._idle_wait()
        await queue.put(_STOPPED)

    async def _confirm_closed(self) -> None:
        """A reply without a next iterator ends the shard only if Kinesis lists it closed
        (or no longer lists it: trimmed). A garbled reply must never checkpoint an open shard
        as ``SHARD_END``: nothing would read it again."""
        for shard in await list_shards(self._kinesis, self._stream):
            if shard.shard_id == self.shard_id and not shard.closed:
                raise RetriableError(
                    f"GetRecords gave no next iterator for shard {self.shard_id}, which is "
                    "still open: not its end; reading again from the checkpoint"
                )

    async def _retry_pause(self, event: str, failures: int, exc: BaseException) -> None:
        """Log a retried Kinesis call (``event``) and wait its jittered backoff."""
        delay = self._backoff.delay(failures)
        self._log.warning(
            event,
            attempt=failures,
            attempts_left=MAX_FETCH_FAILURES - failures + 1,
            delay=round(delay, 3),
            error=f"{type(exc).__name__}: {exc}",
        )
        await asyncio.sleep(delay)

    async def _idle_wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self._idle)

    async def _iterator(self, start: StartPosition) -> str:
        failures = 0
        while True:
            try:
                response = await self._kinesis.get_shard_iterator(
                    StreamName=self._stream, ShardId=self.shard_id, **start.arguments()
                )
            except Exception as exc:
                failures += 1
                if not is_retriable(exc) or failures > MAX_FETCH_FAILURES:
                    raise
                await self._retry_pause("get_shard_iterator_retry", failures, exc)
                continue
            iterator: str = response["ShardIterator"]
            return iterator
