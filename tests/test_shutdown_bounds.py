"""Time limits around handlers that misbehave, on a real worker (in-process, kinesalite and
redis-server): a reader stuck in a handler that ignores its cancellation does not hold up
the shutdown (the lease is released, the replica leaves the live set), and a shard
listener hook that hangs is cut off at SUPERSIM_HANDLER_TIMEOUT."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import orjson
import stubborn
from kinesis_support import create_stream, events, put, worker_settings
from redis.asyncio import Redis
from structlog.testing import capture_logs
from test_observability import get, samples, until
from test_process import start_worker, worker_env

from worker import keys
from worker.consumer.app import run_worker
from worker.consumer.supervisor import ABANDON_GRACE
from worker.devtools.local_servers import free_port

SHARD = "shardId-000000000000"


async def test_a_reader_ignoring_its_cancellation_does_not_hold_up_the_shutdown(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """Stopped while a handler swallows every cancellation, the worker returns within the
    shutdown timeout plus the abandon grace and a second for the releases and hooks,
    naming the abandoned shard; its lease is released and it has left the live set (the
    others take the shard at once), and the hung revoke hook was cut off and logged."""
    switches = stubborn.reset()
    switches.swallow = True
    switches.hang_on_revoke = True
    stream = f"s-{uuid.uuid4().hex[:8]}"
    prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(5))
    settings = worker_settings(
        kinesalite_endpoint,
        redis_url,
        stream,
        handlers=("stubborn:create",),
        shutdown_timeout=1.0,
        handler_timeout=1.0,
        handler_attempts=1,
    )
    stop = asyncio.Event()
    redis = Redis.from_url(redis_url)
    with capture_logs() as logs:
        worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
        try:
            await asyncio.wait_for(switches.entered.wait(), 60)
            await asyncio.sleep(1.5)  # past the handler timeout: the pipeline's cancel, swallowed
            stopped = time.monotonic()
            stop.set()
            summary = await asyncio.wait_for(worker, 30)
            took = time.monotonic() - stopped
            assert await redis.exists(keys.lease(prefix, SHARD)) == 0, "lease released"
            assert await redis.zcard(keys.replicas(prefix)) == 0, "left the live set"
        finally:
            switches.released.set()
            await asyncio.wait_for(switches.left.wait(), 30)
            await redis.aclose()

        async def abandoned_ended() -> bool:
            return any(entry["event"] == "abandoned_reader_ended" for entry in logs)

        await until(abandoned_ended, 10, "the abandoned reader ended, and it was logged")
    assert took < settings.shutdown_timeout + ABANDON_GRACE + 3.0, f"took {took:.1f} s"
    assert summary.abandoned == [SHARD]
    assert switches.swallowed >= 2, "the pipeline's timeout and the shutdown's cancel"
    events_logged = [entry["event"] for entry in logs]
    assert "shutdown_timeout" in events_logged
    assert "shard_reader_abandoned" in events_logged
    timeouts = [entry for entry in logs if entry["event"] == "shard_listener_timeout"]
    assert [(t["handler"], t["shards"]) for t in timeouts] == [("stubborn", [SHARD])]


async def test_a_hung_assignment_hook_is_cut_off_and_counted(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """A shard listener's on_shards_assigned that never returns is cut off after
    SUPERSIM_HANDLER_TIMEOUT (logged, and counted in supersim_handler_timeouts_total), and
    the shard is read all the same."""
    switches = stubborn.reset()
    switches.hang_on_assign = True
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(5))
    port = free_port()
    settings = worker_settings(
        kinesalite_endpoint,
        redis_url,
        stream,
        handlers=("stubborn:create",),
        handler_timeout=1.0,
        http_port=port,
    )
    stop = asyncio.Event()
    with capture_logs() as logs:
        worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
        try:

            async def read() -> dict[str, list[tuple[dict[str, str], float]]] | None:
                status, text = await get(port, "/metrics")
                found = samples(text) if status == 200 else {}
                handled = sum(v for _, v in found.get("supersim_events_handled_total", []))
                return found if handled == 5 else None

            found = await until(read, 60, "the shard read after the hook was cut off")
        finally:
            stop.set()
            await asyncio.wait_for(worker, 30)
    timeouts = found["supersim_handler_timeouts_total"]
    assert [(labels["handler"], value) for labels, value in timeouts] == [("stubborn", 1.0)]
    cut = [entry for entry in logs if entry["event"] == "shard_listener_timeout"]
    assert [(entry["handler"], entry["shards"]) for entry in cut] == [("stubborn", [SHARD])]


async def test_a_worker_process_exits_though_a_handler_ignores_its_cancellation_for_good(
    kinesalite_endpoint: str, redis_url: str, tmp_path: Path
) -> None:
    """``run`` as a process: SIGTERM while the handler swallows every cancellation and never
    returns. The shutdown abandons the reader and releases its lease; the process then
    exits 0 instead of waiting for that task forever, and says which task it left."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(5))
    entered = tmp_path / "entered"
    env = worker_env(
        kinesalite_endpoint,
        redis_url,
        stream,
        SUPERSIM_SHUTDOWN_TIMEOUT="1",
        STUBBORN_ENTERED=str(entered),
    )
    env["SUPERSIM_HANDLERS"] = "stubborn:swallowing"
    process = start_worker(env)
    try:
        deadline = time.monotonic() + 60
        while not entered.exists():
            assert process.poll() is None, process.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the handler never got a batch"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        # Without a bounded exit the process never ends: the wait below would time out.
        returncode = await asyncio.to_thread(process.wait, 60)
    finally:
        process.kill()
        _, stderr = process.communicate()
    assert returncode == 0, stderr.decode()[-2000:]
    lines = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    events_logged = [line.get("event") for line in lines]
    assert "shard_reader_abandoned" in events_logged
    assert "tasks_left_at_exit" in events_logged
    client = Redis.from_url(redis_url)
    try:
        held = await client.exists(keys.lease(keys.prefix(stream, "supersim-worker"), SHARD))
    finally:
        await client.aclose()
    assert held == 0, "the abandoned shard's lease was released"
