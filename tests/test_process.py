"""The worker as a process: SIGTERM mid-batch, kill -9 and restart, fenced checkpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from kinesis_support import create_stream, events, put, worker_settings
from recording import LEFT_BY_FLUSH, seen, seen_key, wait_handled
from redis.asyncio import Redis

from worker import keys
from worker.consumer.app import run_worker
from worker.consumer.checkpoints import CheckpointMoved, Checkpoints, LeaseLost
from worker.consumer.leases import LeaseManager, Renewal

TESTS = Path(__file__).parent


def worker_env(endpoint: str, redis_url: str, stream: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    env.update(
        PYTHONPATH=str(TESTS),
        SUPERSIM_STREAM_NAME=stream,
        SUPERSIM_ENDPOINT_URL=endpoint,
        SUPERSIM_REDIS_URL=redis_url,
        SUPERSIM_HANDLERS="recording:create",
        SUPERSIM_INITIAL_POSITION="TRIM_HORIZON",
        SUPERSIM_IDLE_INTERVAL="0.2",
        SUPERSIM_LEASE_TTL="5",
        SUPERSIM_LOG_FORMAT="json",
        **extra,
    )
    return env


def start_worker(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def checkpoint_of(redis_url: str, key_prefix: str, shard: str) -> str | None:
    client = Redis.from_url(redis_url)
    try:
        value = await client.hget(keys.checkpoints(key_prefix), shard)  # type: ignore[misc]
    finally:
        await client.aclose()
    return None if value is None else value.decode()


SHARD = "shardId-000000000000"


async def test_sigterm_mid_batch_exits_zero_with_checkpoint(
    moto_endpoint: str, redis_url: str
) -> None:
    """SIGTERM while a batch is being handled: the batch finishes, is checkpointed, exit 0."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, events(100))
    env = worker_env(
        moto_endpoint, redis_url, stream, SUPERSIM_BATCH_LIMIT="10", RECORDING_DELAY="0.5"
    )
    process = start_worker(env)
    try:
        await wait_handled(redis_url, key_prefix, 10)
        await asyncio.sleep(0.2)  # the second batch is now in its handler's delay
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 30)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert returncode == 0, stderr.decode()[-2000:]
    handled = await seen(redis_url, key_prefix)
    assert len(handled) == 20, "the in-flight batch was finished, no further batch started"
    assert await checkpoint_of(redis_url, key_prefix, "shardId-000000000000") == handled[-1][1]
    assert b"stopping" in stderr


async def test_kill_9_then_restart_loses_nothing(moto_endpoint: str, redis_url: str) -> None:
    """After kill -9 and a restart every record is handled; repeats come only from the batch in flight."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=2)
    await put(moto_endpoint, stream, events(200))
    batch = 10
    env = worker_env(
        moto_endpoint, redis_url, stream, SUPERSIM_BATCH_LIMIT=str(batch), RECORDING_DELAY="0.1"
    )
    process = start_worker(env)
    try:
        await wait_handled(redis_url, key_prefix, 60)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    before = len(await seen(redis_url, key_prefix))
    assert before < 200
    env["RECORDING_DELAY"] = "0"
    env["SUPERSIM_LEASE_TTL"] = "3"  # the dead worker's leases expire before the restart takes them
    rerun = start_worker(env, "--until-caught-up")
    _, stderr = await asyncio.to_thread(rerun.communicate, timeout=90)
    assert rerun.returncode == 0, stderr.decode()[-2000:]
    sids = [sid for _, _, sid in await seen(redis_url, key_prefix)]
    assert set(sids) == {str(orjson.loads(record)["id"]) for record in events(200)}
    repeats = len(sids) - len(set(sids))
    assert repeats <= 2 * batch, "at most the in-flight batch of each shard is delivered again"


async def test_until_caught_up_exits_3_when_a_handler_left_work_undone(
    moto_endpoint: str, redis_url: str
) -> None:
    """``run --until-caught-up`` that ends caught up but whose last flush left work undone
    (alerts undelivered) exits 3, saying what each handler left in
    ``last_tick_incomplete``, so that a Kubernetes Job does not pass for complete."""
    stream = f"flush-{uuid.uuid4().hex[:8]}"
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(moto_endpoint, stream, shards=1)
    await put(moto_endpoint, stream, events(20))
    env = worker_env(moto_endpoint, redis_url, stream)
    env["SUPERSIM_HANDLERS"] = "recording:create_unfinished_flush"
    process = start_worker(env, "--until-caught-up")
    _, stderr = await asyncio.to_thread(process.communicate, timeout=90)
    assert process.returncode == 3, stderr.decode()[-2000:]
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    incomplete = [line for line in lines if line["event"] == "last_tick_incomplete"]
    assert [line["handlers"] for line in incomplete] == [{"recording": LEFT_BY_FLUSH}]
    assert len(await seen(redis_url, key_prefix)) == 20


async def test_stale_owner_checkpoint_is_refused(redis_url: str) -> None:
    """Once another owner takes the lease, the old owner's checkpoint write is refused."""
    client = Redis.from_url(redis_url)
    try:
        key_prefix = keys.prefix("stream", "group")
        first = LeaseManager(client, key_prefix, "worker-a", ttl_seconds=3)
        second = LeaseManager(client, key_prefix, "worker-b", ttl_seconds=3)
        checkpoints = Checkpoints(client, key_prefix, lease_ttl_seconds=3)
        old = await first.acquire("shard-1")
        assert old is not None
        assert await second.acquire("shard-1") is None, "a live lease is not taken"
        await checkpoints.write(old, "100", previous=None)
        await client.delete(keys.lease(key_prefix, "shard-1"))  # as if it had expired
        new = await second.acquire("shard-1")
        assert new is not None
        assert int(new.token) > int(old.token)
        try:
            await checkpoints.write(old, "150", previous="100")
        except LeaseLost:
            pass
        else:
            raise AssertionError("stale write accepted")
        assert await checkpoints.get("shard-1") == "100"
        await checkpoints.write(new, "200", previous="100")
        assert await checkpoints.get("shard-1") == "200"
        assert await first.renew(old) is Renewal.LOST
        assert await second.renew(new) is Renewal.KEPT
        assert await second.release(new)
        assert await first.holder("shard-1") is None
    finally:
        await client.aclose()


async def test_checkpoint_write_refused_when_redis_lost_the_last_one(redis_url: str) -> None:
    """A checkpoint that is not the one the writer last wrote (Redis lost writes in a
    failover) refuses the write, and leaves the stored one as it is."""
    client = Redis.from_url(redis_url)
    try:
        key_prefix = keys.prefix("stream", "group")
        lease = await LeaseManager(client, key_prefix, "worker-a", ttl_seconds=30).acquire("s")
        assert lease is not None
        checkpoints = Checkpoints(client, key_prefix, lease_ttl_seconds=30)
        await checkpoints.write(lease, "100", previous=None)
        await checkpoints.write(lease, "200", previous="100")
        await client.hset(keys.checkpoints(key_prefix), "s", "100")  # type: ignore[misc]  # "200" lost
        try:
            await checkpoints.write(lease, "300", previous="200")
        except CheckpointMoved:
            pass
        else:
            raise AssertionError("write over a lost checkpoint accepted")
        assert await checkpoints.get("s") == "100"
        await client.hdel(keys.checkpoints(key_prefix), "s")  # type: ignore[misc]  # all lost
        with pytest.raises(CheckpointMoved):
            await checkpoints.write(lease, "300", previous="100")
        assert await checkpoints.get("s") is None
    finally:
        await client.aclose()


async def test_checkpoints_lost_by_redis_are_read_again_not_skipped(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """If Redis loses the latest checkpoint (and whatever handlers wrote with it), as in a
    failover to a replica that had not received them, the running reader notices at its
    next checkpoint and reads again from the stored one: the records in between are handled
    again, none is skipped."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(20))
    settings = worker_settings(kinesalite_endpoint, redis_url, stream, batch_limit=5)
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    client = Redis.from_url(redis_url)
    try:
        await wait_handled(redis_url, key_prefix, 20)
        first = await seen(redis_url, key_prefix)
        tenth = first[9][1]
        checkpoint_key = keys.checkpoints(key_prefix)
        for _ in range(600):  # the 20th record's checkpoint follows its handling
            if await client.hget(checkpoint_key, SHARD) == first[19][1].encode():  # type: ignore[misc]
                break
            await asyncio.sleep(0.05)
        # The failover: the checkpoint goes back to the 10th record, and what the handler
        # wrote for the 10 records after it is gone.
        await client.hset(checkpoint_key, SHARD, tenth)  # type: ignore[misc]
        await client.ltrim(seen_key(key_prefix), 0, 9)  # type: ignore[misc]
        await put(kinesalite_endpoint, stream, events(5, start=20))
        expected = {str(orjson.loads(record)["id"]) for record in events(25)}
        for _ in range(600):
            if {sid for _, _, sid in await seen(redis_url, key_prefix)} == expected:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.aclose()
    assert {sid for _, _, sid in await seen(redis_url, key_prefix)} == expected


async def test_missing_stream_fails_with_a_clear_message(
    moto_endpoint: str, redis_url: str
) -> None:
    """A stream that does not exist stops `run` at once with Kinesis' reason, not a traceback."""
    env = worker_env(moto_endpoint, redis_url, "no-such-stream")
    process = start_worker(env)
    _, stderr = await asyncio.to_thread(process.communicate, timeout=60)
    assert process.returncode == 1
    assert b"ResourceNotFoundException" in stderr
    assert b"Traceback" not in stderr


def test_invalid_setting_names_the_variable() -> None:
    """An invalid setting fails at start-up naming the variable and the allowed values."""
    env = {**os.environ, "SUPERSIM_STREAM_NAME": "s", "SUPERSIM_INITIAL_POSITION": "NEWEST"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"], env=env, capture_output=True, check=False
    )
    assert result.returncode == 2
    assert b"SUPERSIM_INITIAL_POSITION" in result.stderr
    assert b"LATEST, TRIM_HORIZON, AT_TIMESTAMP" in result.stderr
