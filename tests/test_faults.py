"""Throttling, expired iterators and server errors injected by a real HTTP proxy."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from fault_proxy import FaultProxy, Faults
from kinesis_support import create_stream, events, put, put_to_shard, worker_settings
from recording import seen, wait_handled
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker import keys
from worker.consumer.app import run_worker


@pytest.fixture
async def proxy(kinesalite_endpoint: str) -> AsyncIterator[FaultProxy]:
    """A fault-injecting proxy in front of kinesalite."""
    running = await FaultProxy(kinesalite_endpoint).start()
    yield running
    await running.stop()


async def test_throttling_expiry_and_server_errors_lose_nothing(
    proxy: FaultProxy, kinesalite_endpoint: str, redis_url: str
) -> None:
    """Every record is handled exactly once while GetRecords is throttled, expires and fails."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=2)
    await put(kinesalite_endpoint, stream, events(300))
    proxy.faults = Faults(throttle_every=3, expire_every=5, server_error_every=7)
    settings = worker_settings(proxy.url, redis_url, stream, batch_limit=20)
    summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    handled = await seen(redis_url, keys.prefix(stream, "supersim-worker"))
    sids = [sid for _, _, sid in handled]
    assert len(sids) == 300
    assert len(set(sids)) == 300
    assert proxy.injected["ProvisionedThroughputExceededException"] > 0
    assert proxy.injected["ExpiredIteratorException"] > 0
    assert proxy.injected["InternalFailure"] > 0


async def test_idle_shards_never_delay_a_busy_shard(
    proxy: FaultProxy, kinesalite_endpoint: str, redis_url: str
) -> None:
    """With 3 idle shards beside it, a busy shard is read back to back, as if it were alone.

    The idle interval is far longer than the whole read, so any wait on an idle shard would
    show up as the busy shard needing the idle shards to be polled again: it never does.
    """
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=4)
    await put_to_shard(kinesalite_endpoint, stream, events(1000), hash_key="0")
    settings = worker_settings(proxy.url, redis_url, stream, batch_limit=50, idle_interval=60)
    key_prefix = keys.prefix(stream, "supersim-worker")
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    try:
        await wait_handled(redis_url, key_prefix, 1000)
        busy_calls = proxy.get_records_by_shard["shardId-000000000000"]
        idle_calls = [proxy.get_records_by_shard[f"shardId-00000000000{i}"] for i in (1, 2, 3)]
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    assert len(await seen(redis_url, key_prefix)) == 1000
    assert busy_calls >= 1000 // 50
    assert idle_calls == [1, 1, 1]


async def test_stop_during_a_slow_shard_listing_is_not_forgotten(
    proxy: FaultProxy, kinesalite_endpoint: str, redis_url: str
) -> None:
    """A stop that arrives while ListShards is answering ends the worker at once, not when
    the listing returns nor at the next discovery round (a minute away here)."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    proxy.faults = Faults(delay={"ListShards": 10.0})
    settings = worker_settings(proxy.url, redis_url, stream, discovery_interval=60.0)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    await asyncio.wait_for(proxy.called("ListShards"), 20)
    began = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 20)
    assert time.monotonic() - began < 5.0


async def test_shutdown_timeout_counts_from_the_stop_even_during_a_slow_listing(
    proxy: FaultProxy, kinesalite_endpoint: str, redis_url: str
) -> None:
    """A stop while a periodic ListShards hangs (under the client's read timeout) still
    ends the worker within SUPERSIM_SHUTDOWN_TIMEOUT plus the lease releases' second."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(5))
    settings = worker_settings(
        proxy.url, redis_url, stream, discovery_interval=1.0, shutdown_timeout=2.0
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    await wait_handled(redis_url, keys.prefix(stream, "supersim-worker"), 5)
    listed = proxy.calls["ListShards"]
    proxy.faults = Faults(delay={"ListShards": 12.0})
    for _ in range(400):  # until the next periodic listing has begun
        if proxy.calls["ListShards"] > listed:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    began = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 60)
    assert time.monotonic() - began <= 2.0 + 1.5


async def test_an_empty_reply_is_not_the_end_of_an_open_shard(
    proxy: FaultProxy, kinesalite_endpoint: str, redis_url: str
) -> None:
    """A 200 reply without records or a next iterator (garbled on the way) looks like a
    shard's end; the shard is still open, so it is read again, never checkpointed ended."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(30))
    proxy.faults = Faults(empty_at=frozenset({2}))
    settings = worker_settings(proxy.url, redis_url, stream, batch_limit=10)
    summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    assert proxy.injected["empty"] == 1
    key_prefix = keys.prefix(stream, "supersim-worker")
    assert len({sid for _, _, sid in await seen(redis_url, key_prefix)}) == 30
    client = Redis.from_url(redis_url)
    try:
        stored = await client.hgetall(keys.checkpoints(key_prefix))
    finally:
        await client.aclose()
    assert stored
    assert all(b"SHARD_END" not in value for value in stored.values())


async def test_get_shard_iterator_failures_are_retried_and_logged(
    proxy: FaultProxy, kinesalite_endpoint: str, redis_url: str
) -> None:
    """Server errors on GetShardIterator are retried with backoff, each logged with its
    attempt, and nothing is lost."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(10))
    proxy.faults = Faults(fail_first={"GetShardIterator": 2})
    settings = worker_settings(proxy.url, redis_url, stream)
    with capture_logs() as logs:
        summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    retries = [e for e in logs if e["event"] == "get_shard_iterator_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert "InternalFailure" in retries[0]["error"]
    handled = await seen(redis_url, keys.prefix(stream, "supersim-worker"))
    assert len({sid for _, _, sid in handled}) == 10
