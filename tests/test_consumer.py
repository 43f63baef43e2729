"""The consumer end to end, in process, against real Kinesis servers and a real redis-server."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime

import orjson
import pytest
from kinesis_support import create_stream, events, kinesis_client, put, worker_settings
from recording import seen, wait_handled
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker import keys
from worker.cli.dlq import RedriveAborted, redrive
from worker.consumer.app import run_worker
from worker.consumer.deadletter import DeadLetter, DeadLetterStore
from worker.handlers import registry
from worker.handlers.base import Batch
from worker.metrics import Metrics


@pytest.fixture(params=["moto", "kinesalite"])
def kinesis_endpoint(request: pytest.FixtureRequest) -> str:
    """Each test runs against both Kinesis implementations."""
    fixture = "moto_endpoint" if request.param == "moto" else "kinesalite_endpoint"
    return str(request.getfixturevalue(fixture))


def stream_name() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


def prefix(stream: str, group: str = "supersim-worker") -> str:
    return keys.prefix(stream, group)


async def test_every_record_is_handled_once_across_shards(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """A backfill over a 4-shard stream hands every record to the handlers exactly once."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=4)
    records = events(200)
    await put(kinesis_endpoint, stream, records)
    settings = worker_settings(kinesis_endpoint, redis_url, stream)
    summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    handled = await seen(redis_url, prefix(stream))
    assert Counter(sid for _, _, sid in handled) == Counter(sid_of(r) for r in records)
    assert len({shard for shard, _, _ in handled}) > 1


async def test_restart_resumes_exactly_after_clean_stop(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """A second run resumes after the checkpoints: nothing lost, nothing read twice."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=2)
    await put(kinesis_endpoint, stream, events(60))
    settings = worker_settings(kinesis_endpoint, redis_url, stream)
    await run_worker(settings, until_caught_up=True, install_signals=False)
    await put(kinesis_endpoint, stream, events(40, start=60))
    await run_worker(settings, until_caught_up=True, install_signals=False)
    handled = await seen(redis_url, prefix(stream))
    sids = [sid for _, _, sid in handled]
    assert len(sids) == 100
    assert len(set(sids)) == 100


async def test_checkpoints_follow_each_shard_in_sequence_order(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """Per shard, events are handled in sequence order and the checkpoint is the last one."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=2)
    await put(kinesis_endpoint, stream, events(80))
    settings = worker_settings(kinesis_endpoint, redis_url, stream, batch_limit=7)
    await run_worker(settings, until_caught_up=True, install_signals=False)
    handled = await seen(redis_url, prefix(stream))
    by_shard: dict[str, list[int]] = {}
    for shard, sequence, _ in handled:
        by_shard.setdefault(shard, []).append(int(sequence))
    client = Redis.from_url(redis_url)
    try:
        stored = await client.hgetall(keys.checkpoints(prefix(stream)))  # type: ignore[misc]
    finally:
        await client.aclose()
    for shard, sequences in by_shard.items():
        assert sequences == sorted(sequences)
        assert int(stored[shard.encode()]) == sequences[-1]


async def test_poison_record_is_dead_lettered_and_the_shard_moves_on(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """A record a handler always fails on is isolated and dead-lettered; the good ones are handled."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=1)
    good = events(30)
    poison = events(1, start=500, **{"data.sim_unique_name": "poison"})
    garbage = [
        b"not json at all",
        b'{"type": "com.twilio.iot.supersim.connection.attachment.accepted"}',
    ]
    await put(kinesis_endpoint, stream, good[:15] + poison + garbage + good[15:])
    settings = worker_settings(kinesis_endpoint, redis_url, stream, handler_attempts=2)
    summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    handled = await seen(redis_url, prefix(stream))
    assert len(handled) == 30
    client = Redis.from_url(redis_url)
    try:
        store = DeadLetterStore(client, keys.dead_letters(prefix(stream)), 1000, Metrics())
        letters = await store.list()
    finally:
        await client.aclose()
    assert len(letters) == 3
    by_handler = Counter(letter.handler for letter in letters)
    assert by_handler == {"decode": 2, "recording": 1}
    poison_letter = next(letter for letter in letters if letter.handler == "recording")
    assert poison_letter.raw == poison[0]
    assert "poison record" in poison_letter.exception
    assert all(letter.reason for letter in letters)
    assert all(letter.sequence_number and letter.shard_id for letter in letters)


class StoreDown:
    """A handler whose own store is unreachable."""

    name = "recording"

    async def handle(self, batch: Batch) -> None:
        raise ConnectionResetError("store down")

    async def close(self) -> None:
        return None


async def test_redrive_handles_dead_letters_that_now_succeed(
    kinesis_endpoint: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redrive re-runs the handler that failed on each entry and removes those that now
    succeed; other handlers never stand in for it, and an outage stops the redrive."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=1)
    poison = events(2, start=700, **{"data.sim_unique_name": "poison"})
    await put(kinesis_endpoint, stream, [*poison, b"\xff\xfe not utf-8"])
    settings = worker_settings(kinesis_endpoint, redis_url, stream, handler_attempts=1)
    await run_worker(settings, until_caught_up=True, install_signals=False)
    client = Redis.from_url(redis_url)
    try:
        store = DeadLetterStore(client, keys.dead_letters(prefix(stream)), 1000, Metrics())
        assert await store.length() == 3
        (log,) = registry.build(["log"], client, prefix(stream))
        # Only `log` available: the recording handler's entries are not "redriven" by it.
        result = await redrive(store, {"log": log}.get, [log], limit=100)
        assert (result.redriven, result.still_failing) == (0, 3)
        assert {f.handler for f in result.failures} == {"recording", "decode"}
        assert any("not available" in f.error for f in result.failures)
        assert await store.length() == 3
        # The handler fails on them again: they stay, with the new error reported.
        (still_broken,) = registry.build(["recording:create"], client, prefix(stream))
        result = await redrive(store, {"recording": still_broken}.get, None, limit=100)
        assert result.still_failing == 3
        errors = [f.error for f in result.failures if f.handler == "recording"]
        assert errors == ["ValueError: poison record"] * 2
        # An outage stops the redrive; nothing is removed or counted.
        with pytest.raises(RedriveAborted, match="store down"):
            await redrive(store, {"recording": StoreDown()}.get, None, limit=100)
        assert await store.length() == 3
        # Fixed: both poison entries are handled and removed.
        monkeypatch.setenv("RECORDING_ACCEPT_POISON", "1")
        (fixed,) = registry.build(["recording:create"], client, prefix(stream))
        result = await redrive(store, {"recording": fixed}.get, None, limit=100)
        assert (result.redriven, result.still_failing) == (2, 1)
        remaining = await store.list()
    finally:
        await client.aclose()
    assert [letter.handler for letter in remaining] == ["decode"]
    assert "UTF-8" in remaining[0].reason


async def test_redrive_of_records_that_failed_to_decode_needs_the_handler_list(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """A record that failed to decode never reached a handler: once it decodes, it goes
    through the handlers SUPERSIM_HANDLERS names, and is left alone while that is unset."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=1)
    client = Redis.from_url(redis_url)
    try:
        store = DeadLetterStore(client, keys.dead_letters(prefix(stream)), 1000, Metrics())
        record = events(1, start=500)[0]
        await store.add(
            [DeadLetter(record, "shardId-000000000000", "1", "pk", None, "old bug", "decode")]
        )
        (recording,) = registry.build(["recording:create"], client, prefix(stream))
        result = await redrive(store, {}.get, None, limit=10)
        assert result.still_failing == 1
        assert "SUPERSIM_HANDLERS" in result.failures[0].error
        result = await redrive(store, {}.get, [recording], limit=10)
        assert (result.redriven, result.still_failing) == (1, 0)
        assert await store.length() == 0
    finally:
        await client.aclose()
    assert [sid for _, _, sid in await seen(redis_url, prefix(stream))] == [sid_of(record)]


async def test_backfill_from_start_ignores_checkpoints(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """--from-start reads every shard again from TRIM_HORIZON despite existing checkpoints."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=2)
    await put(kinesis_endpoint, stream, events(20))
    settings = worker_settings(kinesis_endpoint, redis_url, stream)
    await run_worker(settings, until_caught_up=True, install_signals=False)
    await run_worker(settings, from_start=True, until_caught_up=True, install_signals=False)
    sids = Counter(sid for _, _, sid in await seen(redis_url, prefix(stream)))
    assert len(sids) == 20
    assert set(sids.values()) == {2}


async def test_latest_start_skips_history(kinesis_endpoint: str, redis_url: str) -> None:
    """With no checkpoint and the default LATEST position, older records are not read."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=1)
    await put(kinesis_endpoint, stream, events(5))
    settings = worker_settings(kinesis_endpoint, redis_url, stream, initial_position="LATEST")
    summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    assert await seen(redis_url, prefix(stream)) == []


async def test_stop_event_stops_gracefully_and_checkpoints(
    kinesis_endpoint: str, redis_url: str
) -> None:
    """Stopping a live worker finishes its batch, writes the checkpoint and releases leases."""
    stream = stream_name()
    await create_stream(kinesis_endpoint, stream, shards=1)
    await put(kinesis_endpoint, stream, events(10))
    settings = worker_settings(kinesis_endpoint, redis_url, stream)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    await wait_handled(redis_url, prefix(stream), 10)
    stop.set()
    await asyncio.wait_for(task, 30)
    client = Redis.from_url(redis_url)
    try:
        leases = await client.keys(keys.lease(prefix(stream), "*"))  # type: ignore[misc]
        checkpoint = await client.hget(keys.checkpoints(prefix(stream)), "shardId-000000000000")  # type: ignore[misc]
    finally:
        await client.aclose()
    assert leases == []
    assert checkpoint is not None


async def test_at_timestamp_backfill_starts_at_that_time(
    moto_endpoint: str, redis_url: str
) -> None:
    """--at-timestamp reads only records that arrived at or after the given time."""
    stream = stream_name()
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, events(10))
    await asyncio.sleep(1.5)
    middle = datetime.now(UTC)
    await asyncio.sleep(1.5)
    later = events(10, start=10)
    await put(moto_endpoint, stream, later)
    settings = worker_settings(moto_endpoint, redis_url, stream)
    summary = await run_worker(
        settings, at_timestamp=middle, until_caught_up=True, install_signals=False
    )
    assert summary.caught_up
    handled = await seen(redis_url, prefix(stream))
    assert len(handled) == 10
    assert {sid for _, _, sid in handled} == {sid_of(r) for r in later}


def sid_of(record: bytes) -> str:
    return str(orjson.loads(record)["id"])


@pytest.mark.parametrize(("retention_days", "warned"), [(8, True), (7, False)])
async def test_a_stream_kept_longer_than_metering_sessions_is_warned_about(
    moto_endpoint: str, redis_url: str, retention_days: int, warned: bool
) -> None:
    """A replay reaching past the session records' retention would count windows twice:
    the worker says so at start-up when the stream's retention allows it."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(moto_endpoint, stream, shards=1)
    async with kinesis_client(moto_endpoint) as client:
        await client.increase_stream_retention_period(
            StreamName=stream, RetentionPeriodHours=retention_days * 24
        )
    settings = worker_settings(moto_endpoint, redis_url, stream, handlers=("metering",))
    with capture_logs() as logs:
        summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    found = [e for e in logs if e["event"] == "metering_session_retention_shorter_than_stream"]
    assert bool(found) is warned
    if warned:
        assert found[0]["stream_retention_hours"] == 192
        assert found[0]["session_retention_days"] == 8
