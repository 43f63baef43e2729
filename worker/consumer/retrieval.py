"""How a shard's records are fetched: the one interface behind which polling
(``worker.consumer.polling``, GetRecords) and enhanced fan-out (``worker.consumer.fanout``,
SubscribeToShard) sit.

A ``Retrieval`` delivers one shard's records in shard order, from where the reader says, as
``Fetched`` batches; the shard reader handles and checkpoints them and never knows which
retrieval runs. The contract, the same for both:

- batches of at most ``ShardFeed.batch_limit`` records, in order, each record once (again
  only after a failure, from a position never past an undelivered record);
- ``millis_behind`` as Kinesis reported it with the batch (``MillisBehindLatest``);
- ``ended`` on the last batch of a shard read to its end, and only once Kinesis lists the
  shard closed (``confirm_closed``): the reader then checkpoints ``SHARD_END``;
- it returns when ``ShardFeed.stopping`` is set, and raises what it cannot retry itself
  (the reader is then restarted from its checkpoint);
- one that fetches on demand (polling) waits for ``ShardFeed.room`` before each fetch, so
  a fetched batch never waits outside the reader's bounded read-ahead: what a shard holds
  in memory is at most the read-ahead and the batch being handled, whatever the backlog.
  One that is pushed (fan-out) waits for it too before it hands over a batch, and holds at
  most about one batch limit of received events meanwhile (merged into that batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import structlog

from worker.backoff import Backoff
from worker.consumer.kinesis import KinesisClient, list_shards
from worker.consumer.pipeline import RawRecord
from worker.consumer.positions import StartPosition
from worker.errors import RetriableError
from worker.metrics import Metrics

MAX_FETCH_FAILURES: Final = 8
"""Failed Kinesis calls in a row before a retrieval gives up (the reader restarts)."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """One batch of a shard's records, as fetched."""

    records: list[RawRecord]
    millis_behind: int | None
    ended: bool


Deliver = Callable[[Fetched], Awaitable[None]]
"""Hands a batch to the reader; waits while the reader's read-ahead queue is full."""


async def _always_room() -> None:
    return None


@dataclass(frozen=True, slots=True)
class ShardFeed:
    """What a retrieval needs to fetch one shard for its reader."""

    kinesis: KinesisClient
    stream: str
    shard_id: str
    start: StartPosition
    batch_limit: int
    idle_interval: float
    stopping: asyncio.Event
    metrics: Metrics
    backoff: Backoff
    answered: Callable[[], None]
    """Called whenever Kinesis answers (for the reader's health)."""
    log: structlog.typing.FilteringBoundLogger
    room: Callable[[], Awaitable[None]] = _always_room
    """Returns once the reader's read-ahead can take a batch without waiting."""


class Retrieval(Protocol):
    """Fetches shards' records; one per process, shared by its readers."""

    name: str
    """``polling`` or ``fanout``: for logs and metrics."""

    async def fetch(self, feed: ShardFeed, deliver: Deliver) -> None:
        """Deliver ``feed.shard_id``'s records from ``feed.start`` until its end (the last
        batch ``ended``) or until ``feed.stopping`` is set."""
        ...


async def confirm_closed(kinesis: KinesisClient, stream: str, shard_id: str) -> None:
    """A shard's end as a reply says it (no next iterator, no continuation) holds only if
    Kinesis lists the shard closed (or no longer lists it: trimmed). A garbled reply must
    never checkpoint an open shard as ``SHARD_END``: nothing would read it again."""
    for shard in await list_shards(kinesis, stream):
        if shard.shard_id == shard_id and not shard.closed:
            raise RetriableError(
                f"Kinesis gave shard {shard_id} an end, but it is still open: not its end; "
                "reading again from the checkpoint"
            )


async def retry_pause(
    feed: ShardFeed, event: str, failures: int, exc: BaseException, what: str
) -> None:
    """Log a retried Kinesis call (``event``) and wait its jittered backoff; past
    ``MAX_FETCH_FAILURES`` in a row, give up with a ``RetriableError`` naming ``what``
    failed (the reader is then restarted from its checkpoint)."""
    if failures > MAX_FETCH_FAILURES:
        raise RetriableError(f"{what} failed {failures} times in a row: {exc}") from exc
    delay = feed.backoff.delay(failures)
    feed.log.warning(
        event,
        attempt=failures,
        attempts_left=MAX_FETCH_FAILURES - failures + 1,
        delay=round(delay, 3),
        error=f"{type(exc).__name__}: {exc}",
    )
    await asyncio.sleep(delay)


def batches(records: list[RawRecord], limit: int) -> list[list[RawRecord]]:
    """``records`` in batches of at most ``limit``, in order (one empty batch if none)."""
    if len(records) <= limit:
        return [records]
    return [records[at : at + limit] for at in range(0, len(records), limit)]
