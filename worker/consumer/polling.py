"""Polling retrieval: a GetRecords loop per shard (the default).

It reads again at once while the shard is behind (``MillisBehindLatest > 0`` or a full
batch), waits ``idle_interval`` when caught up, and never calls GetRecords more often than
its budget (``SUPERSIM_GET_RECORDS_RATE``, 5 a second per shard by default: the shard's
whole read budget, shared by every consumer of the stream; a backfill beside a live group
takes less). Throttling, timeouts and connection errors are retried with capped, jittered
backoff; an expired iterator is replaced AFTER_SEQUENCE_NUMBER of the last record fetched
(all fetched records are handled before anything later, so nothing is skipped or repeated).
A reply without a NextShardIterator ends the shard once ``confirm_closed`` agrees.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Final

from worker.consumer.kinesis import EXPIRED_ITERATOR, error_code, is_retriable
from worker.consumer.pipeline import raw_records
from worker.consumer.positions import LATEST_MARGIN, StartPosition
from worker.consumer.retrieval import (
    Deliver,
    Fetched,
    ShardFeed,
    confirm_closed,
    retry_pause,
)

MAX_CALLS_PER_SECOND: Final = 5.0
"""Kinesis allows 5 GetRecords calls per second per shard (for all its consumers)."""
THROTTLED: Final = frozenset({"ProvisionedThroughputExceededException", "LimitExceededException"})


class Polling:
    """GetRecords, at most ``calls_per_second`` calls a second per shard."""

    name = "polling"

    def __init__(self, calls_per_second: float = MAX_CALLS_PER_SECOND) -> None:
        if not 0 < calls_per_second <= MAX_CALLS_PER_SECOND:
            raise ValueError(f"calls_per_second must be in (0, 5], got {calls_per_second}")
        self.min_interval = 1.0 / calls_per_second

    async def fetch(self, feed: ShardFeed, deliver: Deliver) -> None:
        start = feed.start
        iterator = await _iterator(feed, start)
        if start.iterator_type == "LATEST":
            # Should this iterator expire before a record arrives, start again from when it
            # was taken (with a margin for clock skew), never from a newer LATEST.
            start = StartPosition("AT_TIMESTAMP", timestamp=datetime.now(UTC) - LATEST_MARGIN)
        metrics, shard = feed.metrics, feed.shard_id
        last_call = 0.0
        failures = 0
        while not feed.stopping.is_set():
            await feed.room()  # fetch only what the read-ahead can take
            pause = self.min_interval - (time.monotonic() - last_call)
            if pause > 0:
                await asyncio.sleep(pause)
            last_call = time.monotonic()
            metrics.get_records.labels(shard=shard).inc()
            try:
                response = await feed.kinesis.get_records(
                    ShardIterator=iterator, Limit=feed.batch_limit
                )
            except Exception as exc:
                if error_code(exc) == EXPIRED_ITERATOR:
                    metrics.iterators_expired.labels(shard=shard).inc()
                    feed.log.info("iterator_expired", restart=start.iterator_type)
                    iterator = await _iterator(feed, start)
                    continue
                if not is_retriable(exc):
                    raise
                if error_code(exc) in THROTTLED:
                    metrics.get_records_throttled.labels(shard=shard).inc()
                metrics.get_records_retries.labels(shard=shard).inc()
                failures += 1
                await retry_pause(feed, "get_records_retry", failures, exc, "GetRecords")
                continue
            failures = 0
            feed.answered()
            records = raw_records(response.get("Records", ()))
            behind = response.get("MillisBehindLatest")
            next_iterator = response.get("NextShardIterator")
            # The reply's records are in ``records`` now: no second reference to them may
            # outlive this batch (it would keep a handled batch's data until the next reply).
            del response
            if records:
                start = StartPosition.after(records[-1].sequence_number)
            if next_iterator is None:
                await confirm_closed(feed.kinesis, feed.stream, shard)
            await deliver(Fetched(records, behind, ended=next_iterator is None))
            if next_iterator is None:
                return
            iterator = next_iterator
            if not behind and len(records) < feed.batch_limit:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(feed.stopping.wait(), feed.idle_interval)


async def _iterator(feed: ShardFeed, start: StartPosition) -> str:
    failures = 0
    while True:
        try:
            response = await feed.kinesis.get_shard_iterator(
                StreamName=feed.stream, ShardId=feed.shard_id, **start.arguments()
            )
        except Exception as exc:
            failures += 1
            if not is_retriable(exc):
                raise
            await retry_pause(feed, "get_shard_iterator_retry", failures, exc, "GetShardIterator")
            continue
        iterator: str = response["ShardIterator"]
        return iterator
