"""Time limits around handlers that misbehave, on a real worker (in-process, kinesalite and
redis-server): a reader stuck in a handler that ignores its cancellation does not hold up
the shutdown (the lease is released, the replica leaves the live set, at once, so its
steal requests reserve nothing), a shard listener hook that hangs is cut off at
SUPERSIM_HANDLER_TIMEOUT, or sooner when a stop comes, and never costs the lease; a
periodic handler call ignoring its cancellation is abandoned."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path

import orjson
import stubborn
from kinesis_support import (
    create_stream,
    events,
    kinesis_client,
    put,
    put_to_shard,
    worker_settings,
)
from recording import seen_key
from redis.asyncio import Redis
from structlog.testing import capture_logs
from test_observability import Reporting, failures, get, readings, samples, until
from test_process import start_worker, worker_env

from worker import keys
from worker.consumer import ticker
from worker.consumer.app import run_worker
from worker.consumer.leases import LeaseManager, Renewal
from worker.consumer.supervisor import ABANDON_GRACE
from worker.consumer.ticker import Ticker
from worker.devtools.local_servers import free_port
from worker.handlers.base import Gauge
from worker.metrics import Metrics

SHARD = "shardId-000000000000"


async def one_shard_stream(endpoint: str) -> str:
    """A new one-shard stream holding five events; its name."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(endpoint, stream, shards=1)
    await put(endpoint, stream, events(5))
    return stream


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
    stream = await one_shard_stream(kinesalite_endpoint)
    prefix = keys.prefix(stream, "supersim-worker")
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
    stream = await one_shard_stream(kinesalite_endpoint)
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
    stream = await one_shard_stream(kinesalite_endpoint)
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


async def test_a_stop_during_an_assignment_hook_does_not_wait_out_its_timeout(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """Stopped while the balancing round awaits a hung on_shards_assigned hook, the worker
    cuts the hook off at what is left of the shutdown budget, not at
    SUPERSIM_HANDLER_TIMEOUT: it returns within the shutdown timeout and the abandon grace
    and a second more, its lease released and the cut-off logged."""
    switches = stubborn.reset()
    switches.hang_on_assign = True
    stream = await one_shard_stream(kinesalite_endpoint)
    prefix = keys.prefix(stream, "supersim-worker")
    settings = worker_settings(
        kinesalite_endpoint,
        redis_url,
        stream,
        handlers=("stubborn:create",),
        shutdown_timeout=1.0,
        handler_timeout=30.0,
    )
    stop = asyncio.Event()
    redis = Redis.from_url(redis_url)
    with capture_logs() as logs:
        worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
        try:
            await asyncio.wait_for(switches.assigning.wait(), 60)
            stopped = time.monotonic()
            stop.set()
            await asyncio.wait_for(worker, 60)
            took = time.monotonic() - stopped
            assert await redis.exists(keys.lease(prefix, SHARD)) == 0, "lease released"
        finally:
            stop.set()
            await redis.aclose()
    assert took < settings.shutdown_timeout + ABANDON_GRACE + 1.0, f"took {took:.1f} s"
    cut = [entry for entry in logs if entry["event"] == "shard_listener_timeout"]
    assert [(entry["handler"], entry["shards"]) for entry in cut] == [("stubborn", [SHARD])]


async def test_a_slow_assignment_hook_does_not_cost_the_shard_its_lease(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """An on_shards_assigned hook that outlasts the lease TTL (cut off at a longer
    SUPERSIM_HANDLER_TIMEOUT) does not cost the lease: it is renewed meanwhile, and the
    shard is then read under its first fencing token, no lease going unconfirmed."""
    switches = stubborn.reset()
    switches.hang_on_assign = True
    stream = await one_shard_stream(kinesalite_endpoint)
    prefix = keys.prefix(stream, "supersim-worker")
    settings = worker_settings(
        kinesalite_endpoint,
        redis_url,
        stream,
        handlers=("stubborn:create",),
        lease_ttl=3,
        handler_timeout=5.0,
    )
    stop = asyncio.Event()
    redis = Redis.from_url(redis_url)
    with capture_logs() as logs:
        worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
        try:

            async def read() -> bool:
                return bool(await redis.llen(seen_key(prefix)) == 5)  # type: ignore[misc]

            await until(read, 30, "the shard read after the slow hook")
            fence = await redis.get(keys.fence(prefix, SHARD))
        finally:
            stop.set()
            await asyncio.wait_for(worker, 30)
            await redis.aclose()
    assert fence == b"1", "one tenure: the lease was never lost and taken again"
    logged = [entry["event"] for entry in logs]
    assert "lease_unconfirmed" not in logged
    assert "lease_lost" not in logged
    assert logged.count("shard_listener_timeout") == 1


async def test_a_stopping_replica_no_longer_reserves_the_shard_it_asked_for(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """A replica stopping while its handler holds a batch leaves the live set at once, so
    its steal request is void though its shutdown still waits for the batch: the owner it
    asked keeps the shard (no hand-over to a replica that will never take it), and a lease
    released then is free to the other replicas."""
    switches = stubborn.reset()
    switches.swallow = True
    stream = f"s-{uuid.uuid4().hex[:8]}"
    prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(kinesalite_endpoint, stream, shards=3)
    async with kinesis_client(kinesalite_endpoint) as client:
        listed = (await client.list_shards(StreamName=stream))["Shards"]
    hash_keys = {s["ShardId"]: s["HashKeyRange"]["StartingHashKey"] for s in listed}
    redis = Redis.from_url(redis_url)
    owner = LeaseManager(redis, prefix, "owner", ttl_seconds=3)
    other = LeaseManager(redis, prefix, "other", ttl_seconds=3)
    held = {}
    for sid in hash_keys:
        taken = await owner.acquire(sid)
        assert taken is not None
        held[sid] = taken

    async def owner_alive() -> None:  # the owner replica: heartbeats and renewals
        while True:
            await owner.heartbeat()
            for lease in list(held.values()):
                await owner.renew(lease)
            await asyncio.sleep(0.5)

    alive = asyncio.create_task(owner_alive())
    settings = worker_settings(
        kinesalite_endpoint,
        redis_url,
        stream,
        handlers=("stubborn:create",),
        lease_ttl=3,
        shutdown_timeout=5.0,
        handler_attempts=1,
    )
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    try:

        async def asked() -> tuple[str, str] | None:
            states = await other.snapshot(list(hash_keys))
            return next(((s, st.thief) for s, st in states.items() if st.thief), None)

        wanted, replica = await until(asked, 60, "the worker asked for a shard")
        first = next(sid for sid in hash_keys if sid != wanted)
        await put_to_shard(kinesalite_endpoint, stream, events(5), hash_keys[first])
        await owner.release(held.pop(first))  # free: the worker takes it and reads a batch
        await asyncio.wait_for(switches.entered.wait(), 60)
        assert (await other.snapshot([wanted]))[wanted].thief == replica, "still asking"
        stop.set()

        async def left() -> bool:
            return replica not in (await other.heartbeat(alive=False)).expiry_ms

        await until(left, 2, "the stopping worker left the live set")
        assert not worker.done(), "its shutdown still waits for the batch"
        assert await owner.renew(held[wanted]) is Renewal.KEPT, "its request is void"
        assert await owner.release(held.pop(wanted))
        assert await other.acquire(wanted) is not None, "free to the others"
    finally:
        switches.released.set()
        stop.set()
        alive.cancel()
        await asyncio.gather(alive, return_exceptions=True)
        await asyncio.wait_for(worker, 30)
        await redis.aclose()


async def test_a_gauges_call_ignoring_its_cancellation_is_abandoned() -> None:
    """A handler's gauges() that ignores its cancellation at the handler timeout is
    abandoned after a grace: the reading returns with the other handlers' gauges, the call
    is logged and counted, and that handler is skipped (counted again) until its abandoned
    call ends."""
    steady, stuck = Reporting("steady", 4), Reporting("stuck", 1)
    release, left = asyncio.Event(), asyncio.Event()

    async def swallow() -> list[Gauge]:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue
        left.set()
        return [Gauge("open_alerts", 2, {"kind": "stuck", "group": "HF1"})]

    stuck.gauges = swallow  # type: ignore[method-assign]  # this instance ignores cancellation
    metrics = Metrics()

    async def caught_up() -> bool:
        return False

    periodic = Ticker([steady, stuck], caught_up, metrics, interval=60, timeout=0.2)
    try:
        with capture_logs() as logs:
            began = time.monotonic()
            reading = asyncio.create_task(periodic.read_gauges())
            done, _ = await asyncio.wait({reading}, timeout=10)
            assert done, "the reading waited for the call ignoring its cancellation"
            assert time.monotonic() - began < 0.2 + ticker.ABANDON_GRACE + 1.0
            await asyncio.wait_for(periodic.read_gauges(), 1)  # skipped: still running
    finally:
        release.set()
    await asyncio.wait_for(left.wait(), 5)
    assert readings(metrics) == {"steady": 4}
    assert failures(metrics) == {"stuck": 2}
    failed = [entry for entry in logs if entry["event"] == "handler_periodic_call_failed"]
    assert [entry.get("abandoned") for entry in failed] == [True, None]
    await asyncio.sleep(0)  # the abandoned call's end collected
    await periodic.read_gauges()
    assert readings(metrics) == {"steady": 4, "stuck": 2}
