"""Enhanced fan-out retrieval: SubscribeToShard through a registered stream consumer.

With ``SUPERSIM_RETRIEVAL=fanout`` the worker registers a stream consumer named after its
consumer group (or reuses the one registered by another replica or an earlier run) and
waits until it is ACTIVE. Each owned shard is then read through one subscription at a
time: Kinesis pushes its records as events over a long-lived response (aiobotocore's event
streams), each with ``MillisBehindLatest`` and a continuation sequence number.

- A subscription starts where the reader says (after the checkpoint, AT_TIMESTAMP,
  TRIM_HORIZON or LATEST) and each next one AFTER_SEQUENCE_NUMBER of the last event's
  continuation, so nothing is skipped or read twice across subscriptions. A LATEST start
  is remembered as the time it was taken, never as a newer LATEST.
- AWS ends a subscription after 5 minutes; the reader subscribes again a little before
  (``RENEW_AFTER``), and at once if the server ends it first.
- ``ResourceInUseException`` (another subscription to the shard is still open: a replica
  handing the shard over, or one closed less than 5 seconds ago) is waited out with
  backoff; a dropped connection, a throttled or failed call is retried with backoff.
- An event without a continuation (and with the ``ChildShards``) is the shard's last: the
  shard ends as with polling, once ``ListShards`` shows it closed.
- Events are read ahead of the reader (``_ReadAhead``, at most about one batch of records),
  and those already received when the reader takes the next batch go out as one batch, up
  to ``SUPERSIM_BATCH_LIMIT`` records: a busy shard is handled in batches like polling's, not
  one per event (a Redis round trip and a checkpoint each). Nothing waits for more events:
  an event arriving at an idle reader is delivered at once. A merged batch is checkpointed
  at its last record; the next subscription starts after the last event delivered, so
  events read ahead but not delivered are read again.
- When the account refuses fan-out (no permission, or the stream's limit of consumers),
  ``SUPERSIM_FANOUT_REFUSED`` says what happens: log ``fanout_refused`` and poll instead,
  or stop the worker (exit 2).

The consumer is registered by ``worker.consumer.stream_consumer`` and left in place at exit
(the next start reuses it); ``supersim-worker fanout deregister`` removes it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import structlog
from botocore.exceptions import EventStreamError
from prometheus_client import Counter

from worker.backoff import Backoff
from worker.consumer import kinesis
from worker.consumer.kinesis import KinesisClient, error_code, is_retriable
from worker.consumer.pipeline import raw_records
from worker.consumer.polling import Polling
from worker.consumer.positions import LATEST_MARGIN, StartPosition
from worker.consumer.retrieval import (
    Deliver,
    Fetched,
    Retrieval,
    ShardFeed,
    batches,
    confirm_closed,
    retry_pause,
)
from worker.consumer.stream_consumer import (
    IN_USE,
    NOT_FOUND,
    REFUSED,
    FanOutRefused,
    ensure_consumer,
)
from worker.errors import ConfigError, RetriableError
from worker.metrics import Metrics
from worker.settings import FanOutFallback, RetrievalMode, Settings

RENEW_AFTER: Final = 290.0
"""Seconds after which a subscription is replaced by a new one (AWS ends it at 300)."""
READ_TIMEOUT: Final = 30.0
"""Seconds without an event after which a subscription is taken as dead and replaced."""
MAX_SUBSCRIPTIONS: Final = 1024
"""Connections of the subscribing client (a subscription holds one while open)."""
MAX_IN_USE: Final = 30
"""``ResourceInUseException`` answers in a row (about two minutes) before the reader gives
up and restarts from its checkpoint."""


class FanOutMetrics:
    """Fan-out's own counters, in the worker's registry (lag is the reader's as in polling)."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.subscriptions = Counter(
            "supersim_fanout_subscriptions",
            "SubscribeToShard subscriptions opened.",
            ["shard"],
            registry=r,
        )
        self.resubscriptions = Counter(
            "supersim_fanout_resubscriptions",
            "Subscriptions replaced: renewal (before AWS ends it), expired (ended by the "
            "server), dropped (connection or stream error).",
            ["shard", "reason"],
            registry=r,
        )
        self.in_use = Counter(
            "supersim_fanout_in_use",
            "SubscribeToShard calls answered ResourceInUseException.",
            ["shard"],
            registry=r,
        )
        self.events = Counter(
            "supersim_fanout_events", "SubscribeToShard events received.", ["shard"], registry=r
        )


def starting_position(position: StartPosition) -> dict[str, Any]:
    """SubscribeToShard's ``StartingPosition`` for a reader's start position."""
    args: dict[str, Any] = {"Type": position.iterator_type}
    if position.sequence is not None:
        args["SequenceNumber"] = position.sequence
    if position.timestamp is not None:
        args["Timestamp"] = position.timestamp
    return args


class FanOut:
    """Reads shards through SubscribeToShard; polls instead once fan-out is refused (when
    the settings say so)."""

    name = "fanout"

    def __init__(
        self,
        *,
        subscriber: KinesisClient,
        consumer_arn: str,
        register: Callable[[], Awaitable[str]],
        metrics: FanOutMetrics,
        polling: Polling,
        fallback: FanOutFallback,
        on_refused: Callable[[], None],
        renew_after: float = RENEW_AFTER,
    ) -> None:
        self._subscriber = subscriber
        self.consumer_arn = consumer_arn
        self._register = register
        self._registering = asyncio.Lock()
        self.metrics = metrics
        self.polling = polling
        self._fallback = fallback
        self._on_refused = on_refused
        self.renew_after = renew_after
        self.refusal: str | None = None
        """Why fan-out was refused while running, if it was."""
        self._log = structlog.get_logger("worker.consumer.fanout")

    async def fetch(self, feed: ShardFeed, deliver: Deliver) -> None:
        if self.refusal is not None:
            await self.instead(feed, deliver)
            return
        await _Subscription(self, feed, deliver).run()

    async def instead(self, feed: ShardFeed, deliver: Deliver) -> None:
        """After a refusal: poll from ``feed.start``, or read nothing (the worker stops)."""
        if self._fallback is FanOutFallback.POLLING:
            await self.polling.fetch(feed, deliver)

    def refused(self, reason: str) -> None:
        """The account refused a subscription: poll from now on, or stop the worker."""
        if self.refusal is not None:
            return
        self.refusal = reason
        if self._fallback is FanOutFallback.POLLING:
            self._log.error("fanout_refused", reason=reason, fallback="polling")
        else:
            self._log.error("fanout_refused", reason=reason, fallback="stop")
            self._on_refused()

    async def consumer_missing(self, arn: str) -> None:
        """SubscribeToShard did not find the consumer ``arn`` (or the shard): describe it
        again, and register it again if it was deregistered (once for all readers)."""
        async with self._registering:
            if arn != self.consumer_arn or self.refusal is not None:
                return  # replaced meanwhile by another reader
            try:
                self.consumer_arn = await self._register()
            except FanOutRefused as exc:
                self.refused(str(exc))
                return
            if self.consumer_arn != arn:
                self._log.warning(
                    "fanout_consumer_registered_again", consumer_arn=self.consumer_arn
                )

    async def subscribe(self, shard_id: str, position: StartPosition) -> Any:
        return await self._subscriber.subscribe_to_shard(
            ConsumerARN=self.consumer_arn,
            ShardId=shard_id,
            StartingPosition=starting_position(position),
        )


_ENDED: Final = "ended"
"""The shard was read to its end."""


class _Subscription:
    """One shard's subscriptions, one after the other, for one reader."""

    def __init__(self, fanout: FanOut, feed: ShardFeed, deliver: Deliver) -> None:
        self._fanout = fanout
        self._feed = feed
        self._deliver = deliver
        self._metrics = fanout.metrics
        self._position = feed.start
        """Where the next subscription starts: after the last event delivered."""
        self._backoff = Backoff(base=0.5, cap=5.0)
        self._received = 0
        """Events received on the current subscription."""

    async def run(self) -> None:
        feed, shard = self._feed, self._feed.shard_id
        failures = in_use = subscribed = 0
        reason: str | None = None
        while not feed.stopping.is_set():
            if self._fanout.refusal is not None:
                await self._fanout.instead(replace(feed, start=self._position), self._deliver)
                return
            consumer_arn = self._fanout.consumer_arn
            try:
                response = await self._fanout.subscribe(shard, self._position)
            except Exception as exc:
                code = error_code(exc)
                if code == IN_USE:
                    in_use += 1
                    self._metrics.in_use.labels(shard=shard).inc()
                    if in_use > MAX_IN_USE:
                        raise RetriableError(
                            f"shard {shard} still has another subscription after {in_use} tries"
                        ) from exc
                    delay = self._backoff.delay(in_use)
                    feed.log.info("subscription_in_use", attempt=in_use, delay=round(delay, 3))
                    await asyncio.sleep(delay)
                    continue
                if code in REFUSED:
                    self._fanout.refused(f"SubscribeToShard: {code}: {exc}")
                    continue
                if code == NOT_FOUND:
                    await self._fanout.consumer_missing(consumer_arn)
                elif not is_retriable(exc):
                    raise
                failures += 1
                await retry_pause(
                    feed, "subscribe_to_shard_retry", failures, exc, "SubscribeToShard"
                )
                continue
            in_use = 0
            subscribed += 1
            feed.answered()
            self._metrics.subscriptions.labels(shard=shard).inc()
            if reason is not None:
                self._metrics.resubscriptions.labels(shard=shard, reason=reason).inc()
            log = feed.log.info if subscribed == 1 else feed.log.debug
            log("fanout_subscribed", start=self._position.iterator_type, renewal=reason)
            if self._position.iterator_type == "LATEST":
                # A later subscription before any event must not start at a newer LATEST.
                since = datetime.now(UTC) - LATEST_MARGIN
                self._position = StartPosition("AT_TIMESTAMP", timestamp=since)
            events = response["EventStream"]
            self._received = 0
            try:
                reason = await self._read(events)
            except Exception as exc:
                if not _worth_resubscribing(exc):
                    raise
                reason = "dropped"
                failures = 1 if self._received else failures + 1
                await retry_pause(feed, "subscription_dropped", failures, exc, "subscriptions")
                continue
            finally:
                events.close()
            if reason == _ENDED:
                return
            failures = 0

    async def _read(self, events: Any) -> str:
        """Deliver the subscription's events until it is due for renewal (``renewal``), the
        server ends it (``expired``) or the shard ends (``_ENDED``)."""
        renew_at = time.monotonic() + self._fanout.renew_after
        async with _ReadAhead(events, self._feed.batch_limit, self._received_event) as ahead:
            while True:
                remaining = renew_at - time.monotonic()
                if remaining <= 0:
                    return "renewal"
                try:
                    async with asyncio.timeout(remaining):
                        # Take only what the reader's read-ahead has room for: what arrives
                        # meanwhile is merged into this batch instead of queued behind it.
                        await self._feed.room()
                        taken = await ahead.take()
                except TimeoutError:
                    return "renewal"  # only ``room`` or ``take`` was cut short: nothing taken
                if isinstance(taken, _End):
                    if taken.error is not None:
                        raise taken.error
                    return "expired"
                if await self._deliver_events(taken):
                    return _ENDED

    def _received_event(self) -> None:
        self._feed.answered()
        self._received += 1
        self._metrics.events.labels(shard=self._feed.shard_id).inc()

    async def _deliver_events(self, events: Sequence[Mapping[str, Any]]) -> bool:
        """Hand consecutive events' records to the reader as one batch (in batches of at
        most the limit if an event alone holds more), moving the position after each; True
        when the last event is the shard's last. Its lag is the last event's."""
        feed = self._feed
        records = raw_records(r for event in events for r in event.get("Records", []))
        last_event = events[-1]
        behind = last_event.get("MillisBehindLatest")
        continuation = last_event.get("ContinuationSequenceNumber")
        ended = continuation is None
        if ended:
            await confirm_closed(feed.kinesis, feed.stream, feed.shard_id)
            children = [child.get("ShardId") for child in last_event.get("ChildShards", [])]
            feed.log.info("fanout_shard_closed", children=children)
        chunks = batches(records, feed.batch_limit)
        for number, chunk in enumerate(chunks, start=1):
            last = number == len(chunks)
            await self._deliver(Fetched(chunk, behind, ended=ended and last))
            if chunk:
                self._position = StartPosition.after(chunk[-1].sequence_number)
        if continuation is not None:
            self._position = StartPosition.after(continuation)
        return ended


@dataclass(frozen=True, slots=True)
class _End:
    """A subscription's event stream ended: by the server (no error), or with ``error``."""

    error: Exception | None = None


class _ReadAhead:
    """Reads a subscription's events ahead of the reader, while fewer than ``limit`` records
    wait, so that ``take`` finds the events that arrived while the last batch was being
    delivered. The reading task is owned here: cancelled and awaited on exit (before the
    stream is closed)."""

    def __init__(self, events: Any, limit: int, received: Callable[[], None]) -> None:
        self._events = events
        self._limit = limit
        self._received = received
        self._waiting: deque[Mapping[str, Any] | _End] = deque()
        self._records = 0
        """Records in the events waiting."""
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _ReadAhead:
        self._task = asyncio.create_task(self._read(), name="fanout-read-ahead")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _read(self) -> None:
        stream = aiter(self._events)
        try:
            while True:
                await self._room.wait()
                item = await anext(stream)
                event = item.get("SubscribeToShardEvent")
                if event is None:
                    continue
                self._received()
                self._waiting.append(event)
                self._records += len(event.get("Records", ()))
                if self._records >= self._limit:
                    self._room.clear()
                self._arrived.set()
        except StopAsyncIteration:
            self._waiting.append(_End())
        except Exception as exc:  # handed to the reader after the events before it
            self._waiting.append(_End(exc))
        self._arrived.set()

    async def take(self) -> list[Mapping[str, Any]] | _End:
        """The events received and not yet taken, in order, as many as fit in one batch
        (the first one whatever its size; none after the shard's last); waits only while
        there is none. Or how the stream ended, once its events are all taken. Cancelled
        while waiting, it takes nothing."""
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        head = self._waiting[0]
        if isinstance(head, _End):
            return head
        taken: list[Mapping[str, Any]] = []
        count = 0
        while self._waiting:
            event = self._waiting[0]
            if isinstance(event, _End):
                break
            size = len(event.get("Records", ()))
            if taken and count + size > self._limit:
                break
            self._waiting.popleft()
            taken.append(event)
            count += size
            if event.get("ContinuationSequenceNumber") is None:
                break  # the shard's last event ends its batch
        self._records -= count
        if self._records < self._limit:
            self._room.set()
        return taken


def _worth_resubscribing(exc: BaseException) -> bool:
    """A subscription that failed mid-stream (a dropped connection, a read timeout, an error
    event of the server's) is replaced; other errors go up (the reader restarts)."""
    if isinstance(exc, EventStreamError):
        code = error_code(exc)
        return code in (IN_USE, NOT_FOUND) or is_retriable(exc)
    return is_retriable(exc)


@asynccontextmanager
async def open_retrieval(
    settings: Settings,
    client: KinesisClient,
    metrics: Metrics,
    *,
    on_refused: Callable[[], None],
) -> AsyncIterator[Retrieval]:
    """The retrieval the settings ask for. With fan-out: the stream consumer registered (or
    reused) and ACTIVE, a client for the subscriptions, and, when fan-out is refused,
    polling instead or a ``ConfigError`` (at once, or on exit after ``on_refused`` was called
    to stop the worker), as ``SUPERSIM_FANOUT_REFUSED`` says."""
    polling = Polling(settings.get_records_rate)
    if settings.retrieval is RetrievalMode.POLLING:
        yield polling
        return
    log = structlog.get_logger("worker.consumer.fanout")
    stop = settings.fanout_refused is FanOutFallback.STOP
    try:
        consumer_arn = await ensure_consumer(client, settings.stream_name, settings.consumer_group)
    except FanOutRefused as exc:
        if stop:
            log.error("fanout_refused", reason=str(exc), fallback="stop")
            raise ConfigError(_refused_message(settings, str(exc))) from exc
        log.error("fanout_refused", reason=str(exc), fallback="polling")
        yield polling
        return
    async with kinesis.client(
        settings, read_timeout=READ_TIMEOUT, max_connections=MAX_SUBSCRIPTIONS
    ) as subscriber:
        fanout = FanOut(
            subscriber=subscriber,
            consumer_arn=consumer_arn,
            register=partial(
                ensure_consumer, client, settings.stream_name, settings.consumer_group
            ),
            metrics=FanOutMetrics(metrics),
            polling=polling,
            fallback=settings.fanout_refused,
            on_refused=on_refused,
            renew_after=RENEW_AFTER,
        )
        yield fanout
    if stop and fanout.refusal is not None:
        raise ConfigError(_refused_message(settings, fanout.refusal))


def _refused_message(settings: Settings, reason: str) -> str:
    return (
        f"enhanced fan-out refused for consumer {settings.consumer_group!r} of stream "
        f"{settings.stream_name!r} ({reason}): grant deploy/iam/consumer-fanout-policy.json, "
        "deregister unused stream consumers, or set SUPERSIM_RETRIEVAL=polling "
        "(SUPERSIM_FANOUT_REFUSED=polling falls back by itself)"
    )
