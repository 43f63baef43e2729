"""The batch pipeline on its own: outages told from poison records, a full dead-letter store.

Real redis-server for the dead-letter store; handlers are small in-test classes.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import pytest
import redis.exceptions
from botocore.exceptions import ClientError, EndpointConnectionError
from events import make_other_event, make_record, make_sink_test_event
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker.backoff import Backoff
from worker.consumer import pipeline as pipeline_module
from worker.consumer.deadletter import DeadLetter, DeadLetterStore, DeadLetterStoreFull
from worker.consumer.pipeline import (
    BROKEN_HANDLER_RECORDS,
    DECODE_CHUNK,
    BatchProcessor,
    HandlerUnavailable,
    RawRecord,
)
from worker.events.records import ConnectionEvent, EventKind
from worker.handlers.base import Batch
from worker.metrics import Metrics
from worker.testing.events import as_connection_event

SHARD = "shardId-000000000000"


class Failing:
    """A handler that raises ``error()`` on the events ``fails`` picks, and records the rest."""

    def __init__(self, fails: Callable[[ConnectionEvent], bool], error: Callable[[], Exception]):
        self.name = "failing"
        self.fails = fails
        self.error = error
        self.handled: list[str] = []

    async def handle(self, batch: Batch) -> None:
        if any(self.fails(event) for event in batch.events):
            raise self.error()
        self.handled.extend(event.event_sid for event in batch.events)

    async def close(self) -> None:
        return None


def records(kinds: list[str], start: int = 0) -> list[RawRecord]:
    return [
        RawRecord(make_record(kind, seq=start + i), str(start + i).zfill(20), "pk")
        for i, kind in enumerate(kinds)
    ]


def store(client: Redis, maxlen: int = 1000) -> DeadLetterStore:
    return DeadLetterStore(client, f"test:{uuid.uuid4().hex}:dlq", maxlen, Metrics())


def processor(handler: Failing, dlq: DeadLetterStore) -> BatchProcessor:
    return BatchProcessor([handler], dlq, Metrics(), backoff=Backoff(base=0.001, cap=0.002))


def is_session(event: ConnectionEvent) -> bool:
    return event.kind.is_data_session


async def test_a_few_poison_records_are_dead_lettered_and_the_rest_handled(redis: Redis) -> None:
    """Fewer than the outage threshold: bisected out, dead-lettered, the batch completes."""
    dlq = store(redis)
    handler = Failing(is_session, lambda: ValueError("bad session"))
    kinds = ["attachment.accepted"] * 17 + ["data-session.updated"] * 3
    outcome = await processor(handler, dlq).process(SHARD, records(kinds))
    assert outcome.dead_lettered == 3
    assert len(handler.handled) == 17
    assert len(await dlq.list()) == 3


async def test_same_failure_on_many_records_across_batches_is_an_outage(redis: Redis) -> None:
    """A handler failing with one exception type on record after record, in small mixed
    batches that never fail whole, is treated as broken: the batch is kept, not
    dead-lettered record by record."""
    dlq = store(redis)
    handler = Failing(is_session, lambda: KeyError("network"))
    pipeline = processor(handler, dlq)
    kinds = ["attachment.accepted", "data-session.updated", "attachment.accepted"]
    for batch in range(BROKEN_HANDLER_RECORDS - 1):
        outcome = await pipeline.process(SHARD, records(kinds, start=10 * batch))
        assert outcome.dead_lettered == 1
    with pytest.raises(HandlerUnavailable, match="KeyError"):
        await pipeline.process(SHARD, records(kinds, start=1000))
    assert len(await dlq.list()) == BROKEN_HANDLER_RECORDS - 1


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.NoPermissionError("NOPERM this user has no permissions"),
        redis.exceptions.ResponseError("BUSY Redis is busy running a script"),
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
        OSError(errno.EHOSTUNREACH, "No route to host"),
        socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        EndpointConnectionError(endpoint_url="https://dynamodb.example"),
        ClientError({"Error": {"Code": "ThrottlingException"}}, "PutItem"),
    ],
    ids=["noperm", "busy", "moved", "misconf", "no-route", "dns", "aws-endpoint", "aws-throttled"],
)
async def test_redis_refusals_are_outages_not_poison(redis: Redis, error: Exception) -> None:
    """Permission, busy-server, cluster redirection and persistence errors of Redis, and
    network or AWS outages met by a handler, are never the data's fault."""
    dlq = store(redis)
    handler = Failing(is_session, lambda: error)
    kinds = ["attachment.accepted"] * 5 + ["data-session.updated"]
    with pytest.raises(HandlerUnavailable):
        await processor(handler, dlq).process(SHARD, records(kinds))
    assert await dlq.list() == []


def letter(n: int) -> DeadLetter:
    return DeadLetter(b"x", SHARD, str(n), "pk", None, "test", "decode")


async def test_full_store_refuses_instead_of_dropping_the_oldest(redis: Redis) -> None:
    """At capacity a write is refused (the batch waits); no entry is ever trimmed away."""
    dlq = store(redis, maxlen=100)
    await dlq.add([letter(n) for n in range(95)])
    with pytest.raises(DeadLetterStoreFull, match="95 of 100"):
        await dlq.add([letter(n) for n in range(95, 101)])
    await dlq.add([letter(n) for n in range(95, 100)])  # exactly full is fine
    with pytest.raises(DeadLetterStoreFull):
        await dlq.add([letter(100)])
    kept = await dlq.list(count=1000)
    assert [item.sequence_number for item in kept] == [str(n) for n in range(100)]


async def test_decoding_a_large_batch_lets_other_tasks_run_between_chunks(redis: Redis) -> None:
    """A batch is decoded ``DECODE_CHUNK`` records at a time, the event loop running other
    tasks (a lease renewal) in between; the handler still gets every event, in order."""
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    seen: list[int] = []
    handler = Failing(lambda _: False, lambda: ValueError("never"))
    original = handler.handle

    async def handle(batch: Batch) -> None:
        seen.append(turns)
        await original(batch)

    handler.handle = handle  # type: ignore[method-assign]
    kinds = ["attachment.accepted", "data-session.updated"] * (3 * DECODE_CHUNK // 2) + [
        "attachment.failed"
    ]
    batch = records(kinds)
    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    try:
        started = turns
        outcome = await processor(handler, store(redis)).process(SHARD, batch)
    finally:
        other.cancel()
    assert seen[0] - started >= 3  # four chunks: three turns for the other task
    assert outcome.handled == len(kinds) == 3 * DECODE_CHUNK + 1
    expected = [orjson.loads(record.data)["data"]["event_sid"] for record in batch]
    assert handler.handled == expected
    assert outcome.kinds == {
        "attachment.accepted": 3 * DECODE_CHUNK // 2,
        "data-session.updated": 3 * DECODE_CHUNK // 2,
        "attachment.failed": 1,
    }


async def test_empty_store_takes_a_batch_bigger_than_its_capacity(redis: Redis) -> None:
    """Else a single huge batch of bad records could never be dead-lettered."""
    dlq = store(redis, maxlen=100)
    await dlq.add([letter(n) for n in range(150)])
    assert len(await dlq.list(count=1000)) == 150


async def test_batch_waits_when_the_store_is_full(redis: Redis) -> None:
    """A batch whose bad records do not fit is not completed, so it is not checkpointed."""
    dlq = store(redis, maxlen=100)
    await dlq.add([letter(n) for n in range(100)])
    handler = Failing(lambda event: False, lambda: ValueError())
    bad = RawRecord(b"not json", "99".zfill(20), "pk")
    with pytest.raises(DeadLetterStoreFull):
        await processor(handler, dlq).process(SHARD, [*records(["attachment.accepted"]), bad])


async def test_a_batch_retried_for_another_reason_does_not_count_its_poison_twice(
    redis: Redis,
) -> None:
    """Poison records of a batch that waited (here for a full dead-letter store) are counted
    once per record, however often the batch comes back: no outage, and once there is
    room they are dead-lettered."""
    dlq = store(redis, maxlen=100)
    await dlq.add([letter(n) for n in range(99)])
    handler = Failing(is_session, lambda: ValueError("bad session"))
    pipeline = processor(handler, dlq)
    batch = records(["attachment.accepted"] * 5 + ["data-session.updated"] * 4)
    for _ in range(3):
        with pytest.raises(DeadLetterStoreFull):
            await pipeline.process(SHARD, batch)
    await redis.delete(dlq.key)
    outcome = await pipeline.process(SHARD, batch)
    assert outcome.dead_lettered == 4


async def test_a_batch_waits_for_a_broken_handler_at_most_the_patience(redis: Redis) -> None:
    """Eight bad records in one batch look like a broken handler, so the batch waits; once
    they have failed for ``outage_patience`` they are dead-lettered and the rest handled,
    instead of the shard stalling on them for good."""
    dlq = store(redis)
    handler = Failing(is_session, lambda: KeyError("network"))
    pipeline = BatchProcessor(
        [handler], dlq, Metrics(), backoff=Backoff(base=0.001, cap=0.002), outage_patience=0.5
    )
    kinds = ["attachment.accepted"] * 40 + ["data-session.updated"] * 8
    batch = records(kinds)
    with pytest.raises(HandlerUnavailable, match=r"the batch waits \(for at most [01] s more\)"):
        await pipeline.process(SHARD, batch)
    assert await dlq.list() == []
    await asyncio.sleep(0.6)
    outcome = await pipeline.process(SHARD, batch)
    assert outcome.dead_lettered == 8
    assert len(await dlq.list()) == 8
    assert len(set(handler.handled)) == 40


async def test_a_batch_failing_whole_waits_at_most_the_patience(redis: Redis) -> None:
    """The same for a big batch whose every record fails (a handler failing on everything):
    once the patience is spent the whole batch is dead-lettered in one pass, not eight
    records per patience. A batch of the shard going through the handler without it
    looking broken ends the outage, and the next one waits again."""
    dlq = store(redis)
    handler = Failing(lambda event: event.kind.is_data_session, lambda: RuntimeError("boom"))
    pipeline = BatchProcessor(
        [handler], dlq, Metrics(), backoff=Backoff(base=0.001, cap=0.002), outage_patience=0.5
    )
    batch = records(["data-session.updated"] * 40)
    with pytest.raises(HandlerUnavailable):
        await pipeline.process(SHARD, batch)
    await asyncio.sleep(0.6)
    outcome = await pipeline.process(SHARD, batch)
    assert outcome.dead_lettered == 40
    # Still broken: new records are dead-lettered at once while the outage lasts...
    outcome = await pipeline.process(SHARD, records(["data-session.updated"] * 10, start=100))
    assert outcome.dead_lettered == 10
    # ...also while another shard's batches go through...
    await pipeline.process("shardId-000000000001", records(["attachment.accepted"] * 3, 150))
    outcome = await pipeline.process(SHARD, records(["data-session.updated"] * 10, start=160))
    assert outcome.dead_lettered == 10
    # ...until one of this shard's goes through; the next outage waits again.
    await pipeline.process(SHARD, records(["attachment.accepted"] * 3, start=200))
    with pytest.raises(HandlerUnavailable):
        await pipeline.process(SHARD, records(["data-session.updated"] * 10, start=300))


async def test_an_outage_ends_though_a_few_bad_records_keep_coming(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After an outage, bad records now and then (too few to look like a broken handler)
    are dead-lettered one by one and end that outage: a later broken spell is a new
    outage, and its batch waits the patience again instead of being dead-lettered at once
    (and the patience running out is logged again)."""
    monkeypatch.setattr(pipeline_module, "BROKEN_HANDLER_WINDOW", 0.3)
    dlq = store(redis)
    handler = Failing(is_session, lambda: ValueError("bad session sid"))
    pipeline = BatchProcessor(
        [handler], dlq, Metrics(), backoff=Backoff(base=0.001, cap=0.002), outage_patience=0.5
    )
    kinds = ["attachment.accepted"] * 4 + ["data-session.updated"] * 8
    with pytest.raises(HandlerUnavailable):
        await pipeline.process(SHARD, records(kinds))
    await asyncio.sleep(0.6)
    assert (await pipeline.process(SHARD, records(kinds))).dead_lettered == 8
    for start in range(100, 600, 100):  # one bad record every 0.4 s, for 2 s
        await asyncio.sleep(0.4)
        outcome = await pipeline.process(
            SHARD, records(["attachment.accepted", "data-session.updated"], start=start)
        )
        assert outcome.dead_lettered == 1
    with pytest.raises(HandlerUnavailable, match="the batch waits"):
        await pipeline.process(SHARD, records(kinds, start=1000))


async def test_other_shards_batches_going_through_do_not_hold_a_batch_back_for_good(
    redis: Redis,
) -> None:
    """Eight bad records on one shard make its batch wait as for a broken handler, while
    the handler goes on handling other shards' batches. Those passes do not restart the
    wait: the batch's bad records are dead-lettered once the patience is spent, so a busy
    stream never holds one shard back for good."""
    dlq = store(redis)
    handler = Failing(is_session, lambda: ValueError("bad session sid"))
    pipeline = BatchProcessor(
        [handler], dlq, Metrics(), backoff=Backoff(base=0.001, cap=0.002), outage_patience=0.5
    )
    stuck = records(["attachment.accepted"] * 40 + ["data-session.updated"] * 8)
    other = "shardId-000000000001"
    with pytest.raises(HandlerUnavailable):
        await pipeline.process(SHARD, stuck)
    for start in (1000, 2000, 3000):
        await asyncio.sleep(0.2)
        outcome = await pipeline.process(other, records(["attachment.accepted"] * 5, start=start))
        assert outcome.handled == 5
    outcome = await pipeline.process(SHARD, stuck)
    assert outcome.dead_lettered == 8
    assert len(await dlq.list()) == 8
    assert outcome.handled == 40


async def test_each_handler_failing_on_a_record_gets_its_own_entry(redis: Redis) -> None:
    """Two handlers failing on one record: two entries, so a redrive re-runs each of them."""
    dlq = store(redis)
    first = Failing(is_session, lambda: ValueError("first"))
    second = Failing(is_session, lambda: KeyError("second"))
    second.name = "second"
    pipeline = BatchProcessor(
        [first, second], dlq, Metrics(), backoff=Backoff(base=0.001, cap=0.002)
    )
    outcome = await pipeline.process(
        SHARD, records(["attachment.accepted", "data-session.updated"])
    )
    assert outcome.handled == 1
    letters = await dlq.list()
    assert sorted(letter.handler for letter in letters) == ["failing", "second"]
    assert len({letter.sequence_number for letter in letters}) == 1


class Stubborn:
    """A handler that sleeps past the time limit and, when cancelled, does what ``on_cancel``
    says: swallow it and return, or turn it into another error."""

    def __init__(self, on_cancel: str) -> None:
        self.name = "stubborn"
        self.on_cancel = on_cancel

    async def handle(self, batch: Batch) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if self.on_cancel == "swallow":
                return
            raise ValueError("cancelled while writing") from None

    async def close(self) -> None:
        return None


@pytest.mark.parametrize("on_cancel", ["swallow", "convert"])
async def test_a_timed_out_handler_is_an_outage_whatever_it_does_with_the_cancellation(
    redis: Redis, on_cancel: str
) -> None:
    """Past SUPERSIM_HANDLER_TIMEOUT the call is an outage: the batch is not taken as done
    (so not checkpointed) and nothing is dead-lettered, even when the handler swallows its
    cancellation and returns, or turns it into an error of its own."""
    dlq = store(redis)
    metrics = Metrics()
    pipeline = BatchProcessor(
        [Stubborn(on_cancel)],
        dlq,
        metrics,
        attempts=2,
        backoff=Backoff(base=0.001, cap=0.002),
        timeout=0.05,
    )
    with pytest.raises(HandlerUnavailable, match=r"took longer than 0\.05 s"):
        await pipeline.process(SHARD, records(["attachment.accepted"] * 3))
    assert await dlq.length() == 0
    assert metrics.handler_timeouts.labels(handler="stubborn")._value.get() == 2


class Noting:
    """A handler that keeps what each batch it gets says of itself (kinds, latest time),
    and what its events say."""

    name = "noting"

    def __init__(self) -> None:
        self.noted: list[tuple[list[EventKind], datetime | None]] = []
        self.told: list[tuple[list[EventKind], datetime, datetime]] = []

    async def handle(self, batch: Batch) -> None:
        self.noted.append((list(batch.kinds), batch.latest))
        times = [event.envelope.data.timestamp for event in batch.events]
        self.told.append(([event.kind for event in batch.events], max(times), times[-1]))

    async def close(self) -> None:
        return None


async def test_the_batch_notes_kinds_and_latest_time_as_it_decodes(redis: Redis) -> None:
    """``Batch.kinds`` and ``Batch.latest``, noted while decoding (over more than one
    ``DECODE_CHUNK``), are what the events say, with corrupt records, sink test events and
    other products' events left out, and times out of order: the latest is in the second
    chunk, neither first nor last."""
    count = 2 * DECODE_CHUNK + 100
    order = random.Random(7).sample(range(count), count)
    newest = order.index(count - 1)
    order[newest], order[DECODE_CHUNK + 50] = order[DECODE_CHUNK + 50], order[newest]
    kinds = ["attachment.accepted", "data-session.updated", "attachment.rejected"]
    start = datetime(2024, 3, 1, tzinfo=UTC)
    raw = [
        make_record(kinds[i % 3], seq=i, at=start + timedelta(seconds=seconds))
        for i, seconds in enumerate(order)
    ]
    raw[DECODE_CHUNK - 1 : DECODE_CHUNK - 1] = [
        b"{not json",
        orjson.dumps(make_sink_test_event()),
        orjson.dumps(make_other_event()),
    ]
    batch_records = [RawRecord(data, str(i).zfill(20), "pk") for i, data in enumerate(raw)]
    noting = Noting()
    dlq = store(redis)
    outcome = await BatchProcessor([noting], dlq, Metrics()).process(SHARD, batch_records)
    assert outcome.dead_lettered == 1
    assert sum(outcome.skipped.values()) == 2
    [(noted_kinds, latest)] = noting.noted
    [(told_kinds, latest_told, last_told)] = noting.told
    assert len(noted_kinds) == count
    assert noted_kinds == told_kinds
    assert latest == latest_told == start + timedelta(seconds=count - 1)
    assert last_told < latest_told
    assert dict(outcome.kinds) == {k.value: noted_kinds.count(k) for k in set(noted_kinds)}


async def test_each_other_event_type_is_logged_once_as_it_is_skipped(redis: Redis) -> None:
    """Records of other CloudEvent types are skipped and counted; the first record of each
    type is logged with where it is, so a misspelt connection type does not go unseen."""
    misspelt = "com.twilio.iot.SuperSim.connection.data-session.updated"
    raw = [
        orjson.dumps(make_other_event()),
        orjson.dumps(make_other_event(misspelt)),
        make_record("attachment.accepted", seq=1),
        orjson.dumps(make_other_event()),
        orjson.dumps(make_other_event(misspelt)),
    ]
    batch_records = [RawRecord(data, str(i).zfill(20), "pk") for i, data in enumerate(raw)]
    handler = Failing(lambda event: False, lambda: ValueError("never"))
    pipeline = processor(handler, store(redis))
    with capture_logs() as logs:
        outcome = await pipeline.process(SHARD, batch_records)
        again = await pipeline.process(SHARD, batch_records)
    assert outcome.skipped["other_type"] == again.skipped["other_type"] == 4
    assert outcome.handled == 1
    lines = [line for line in logs if line["event"] == "other_event_type_skipped"]
    assert [(line["type"], line["sequence_number"]) for line in lines] == [
        ("com.twilio.messaging.message.delivered", "0" * 20),
        (misspelt, "0" * 19 + "1"),
    ]
    assert lines[0]["shard_id"] == SHARD


def test_a_split_batch_works_out_its_halves() -> None:
    kinds = ["attachment.accepted", "data-session.updated"]
    events = [
        as_connection_event(make_record(kinds[i % 2], seq=i, at=f"2024-03-01T10:0{t}:00Z"))
        for i, t in enumerate([3, 1, 7, 2, 9, 4])
    ]
    whole = Batch.decoded(SHARD, events, [event.kind for event in events], None)
    left, right = whole.split()
    for half, minute in ((left, 7), (right, 9)):
        assert list(half.kinds) == [event.kind for event in half.events]
        assert half.latest == datetime(2024, 3, 1, 10, minute, tzinfo=UTC)
    empty = Batch(SHARD, [])
    assert empty.latest is None
    assert list(empty.kinds) == []
