"""The consumer under failures: handler outages, Redis outages, odd handler errors, restarts."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import orjson
import pytest
import redis.exceptions as redis_exceptions
from kinesis_support import create_stream, events, put, worker_settings
from recording import seen, wait_handled
from redis.asyncio import Redis
from servers import start_redis

from worker import keys
from worker.cli.main import main
from worker.consumer.app import run_worker
from worker.consumer.deadletter import DeadLetterStore
from worker.metrics import Metrics


def stream_name() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


async def dead_letters(redis_url: str, key_prefix: str) -> list[str]:
    client = Redis.from_url(redis_url)
    try:
        store = DeadLetterStore(client, keys.dead_letters(key_prefix), 1000, Metrics())
        return [letter.handler for letter in await store.list()]
    finally:
        await client.aclose()


async def test_backfill_restarted_after_a_handler_outage_rereads_everything(
    moto_endpoint: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill whose reader restarts (handler store down) never resumes from an old checkpoint."""
    stream = stream_name()
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, [*events(30), b"not json"])
    settings = worker_settings(moto_endpoint, redis_url, stream, handler_attempts=2)
    await run_worker(settings, until_caught_up=True, install_signals=False)
    monkeypatch.setenv("RECORDING_FAIL_FIRST", "2")
    summary = await run_worker(
        settings, from_start=True, until_caught_up=True, install_signals=False
    )
    assert summary.caught_up
    counts = Counter(sid for _, _, sid in await seen(redis_url, key_prefix))
    assert len(counts) == 30
    assert set(counts.values()) == {2}, "the backfill handled every record again"
    assert await dead_letters(redis_url, key_prefix) == ["decode", "decode"], (
        "one entry per run for the bad record, none for the retried batch"
    )


async def test_handler_raising_cancelled_error_dead_letters_the_record(
    moto_endpoint: str, redis_url: str
) -> None:
    """A CancelledError raised by a handler is a handler failure, not a reason to spin."""
    stream = stream_name()
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(
        moto_endpoint,
        stream,
        [
            *events(5),
            *events(1, start=50, **{"data.sim_unique_name": "cancel"}),
            *events(5, start=5),
        ],
    )
    settings = worker_settings(moto_endpoint, redis_url, stream, handler_attempts=1)
    summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    assert len(await seen(redis_url, key_prefix)) == 10
    assert await dead_letters(redis_url, key_prefix) == ["recording"]


async def test_latest_start_then_restart_loses_nothing_in_between(
    moto_endpoint: str, redis_url: str
) -> None:
    """A worker started at LATEST and restarted before any record still reads what came between."""
    stream = stream_name()
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, events(3))  # history LATEST skips
    settings = worker_settings(moto_endpoint, redis_url, stream, initial_position="LATEST")
    first = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert first.caught_up
    await asyncio.sleep(1.1)
    later = events(4, start=100)
    await put(moto_endpoint, stream, later)  # while no worker runs
    second = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert second.caught_up
    handled = {sid for _, _, sid in await seen(redis_url, key_prefix)}
    # The restart resumes from when the first run started, less a margin for clock skew,
    # so records from just before it may be read too: nothing after it is skipped.
    assert {str(orjson.loads(record)["id"]) for record in later} <= handled


async def test_worker_keeps_running_through_a_redis_outage(moto_endpoint: str) -> None:
    """Redis going away and coming back does not end the worker; it goes on handling records."""
    redis = start_redis()
    port = redis.port
    stream = stream_name()
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, events(5))
    settings = worker_settings(moto_endpoint, redis.url, stream, lease_ttl=3)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    replacement = None
    try:
        await wait_handled(redis.url, key_prefix, 5)
        redis.stop()
        await asyncio.sleep(3)
        assert not worker.done(), "the worker stopped when Redis went away"
        replacement = start_redis(port=port)
        await put(moto_endpoint, stream, events(5, start=5))
        await wait_handled(replacement.url, key_prefix, 5, within=90)
        assert not worker.done()
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
        if replacement is not None:
            replacement.stop()


async def test_worker_keeps_running_while_redis_refuses_writes(moto_endpoint: str) -> None:
    """Redis refusing writes because it cannot persist (MISCONF, as on a full disk) is an
    outage: the worker waits it out, then goes on handling records."""
    # Snapshots cannot be written under /proc, so a BGSAVE fails as on a full disk.
    redis = start_redis(extra=["--dir", "/proc"])
    stream = stream_name()
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, events(5))
    settings = worker_settings(moto_endpoint, redis.url, stream, lease_ttl=3)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    client = Redis.from_url(redis.url)
    try:
        await wait_handled(redis.url, key_prefix, 5)
        await client.config_set("save", "3600 1")
        await client.bgsave()
        for _ in range(200):
            if (await client.info("persistence"))["rdb_last_bgsave_status"] != "ok":
                break
            await asyncio.sleep(0.05)
        with pytest.raises(redis_exceptions.ResponseError, match=r"^MISCONF"):
            await client.set("probe", "1")
        await put(moto_endpoint, stream, events(5, start=5))
        await asyncio.sleep(5)  # lease renewals, checkpoints and discovery all refused
        assert not worker.done(), "the worker stopped while Redis refused writes"
        await client.config_set("save", "")  # writes are accepted again
        await wait_handled(redis.url, key_prefix, 10, within=90)
        assert not worker.done()
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
        await client.aclose()
        redis.stop()


async def test_dlq_commands_list_redrive_and_delete(
    moto_endpoint: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`dlq list` shows each dead letter with its reason; `dlq redrive` clears what now works;
    `dlq delete` removes entries by id."""
    stream = stream_name()
    await create_stream(moto_endpoint, stream, shards=1)
    poison = events(1, start=900, **{"data.sim_unique_name": "poison"})
    await put(moto_endpoint, stream, [*events(3), *poison, b"[1, 2]"])
    settings = worker_settings(moto_endpoint, redis_url, stream, handler_attempts=1)
    await run_worker(settings, until_caught_up=True, install_signals=False)
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", stream)
    monkeypatch.setenv("SUPERSIM_REDIS_URL", redis_url)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["dlq", "list", "--json"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(row["handler"] for row in rows) == ["decode", "recording"]
    assert any("JSON array" in row["reason"] for row in rows)
    assert await asyncio.to_thread(main, ["dlq", "list", "--limit", "1"]) == 0
    first_page = capsys.readouterr().out
    assert "1 shown of 2 dead-lettered records (next: --after " in first_page
    after = first_page.split("--after ")[1].rstrip(")\n")
    assert await asyncio.to_thread(main, ["dlq", "list", "--after", after]) == 0
    assert "1 shown of 2" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["dlq", "list", "--newest", "--limit", "1"]) == 0
    assert (
        "[recording] handler recording failed on this record after retries: ValueError: poison record"
        in capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as exited:
        main(["dlq", "list", "--limit", "0"])
    assert exited.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    # The handler that failed is fixed; the array still fails to decode.
    monkeypatch.setenv("SUPERSIM_HANDLERS", "recording:create")
    monkeypatch.setenv("RECORDING_ACCEPT_POISON", "1")
    assert await asyncio.to_thread(main, ["dlq", "redrive"]) == 1
    out = capsys.readouterr().out
    assert "redriven 1" in out
    assert "still fails [decode] DecodeError: record is a JSON array" in out
    assert await asyncio.to_thread(main, ["dlq", "list"]) == 0
    listing = capsys.readouterr().out
    assert "1 shown of 1 dead-lettered records" in listing
    left = listing.split()[0]
    assert await asyncio.to_thread(main, ["dlq", "delete", "bogus"]) == 2
    assert "not entry ids: bogus" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["dlq", "delete", left, left, "0-1"]) == 1  # no 0-1
    assert "deleted 1 of 2 entries" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["dlq", "list"]) == 0
    assert "0 shown of 0 dead-lettered records" in capsys.readouterr().out
