"""The worker's HTTP endpoints, on a real worker process: /metrics while a stream is
consumed, /readyz while Redis is away, /healthz when a handler hangs, and the ``health``
command that exec probes run; and the handlers' readings (``HasGauges``) when some of them
fail."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import servers
from kinesis_support import create_stream, events, put
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from structlog.testing import capture_logs
from test_process import worker_env

from worker import keys
from worker.consumer.deadletter import DeadLetter, DeadLetterStore, LengthGauge
from worker.consumer.ticker import Ticker
from worker.devtools.local_servers import RedisServer, free_port
from worker.handlers.base import Batch, Gauge
from worker.metrics import Metrics


def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def get(port: int, path: str) -> tuple[int, str]:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)
            ) as response,
        ):
            return response.status, await response.text()
    except aiohttp.ClientError:
        return 0, ""


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(value for _, value in found.get(name, []))


async def until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.2)


def health(env: dict[str, str], *args: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "worker", "health", *args], env=env, capture_output=True, timeout=30
    ).returncode


def letters(count: int) -> list[DeadLetter]:
    return [
        DeadLetter(b"{", "shardId-000000000000", str(n), "pk", None, "bad JSON", "decode")
        for n in range(count)
    ]


async def left_by_an_earlier_run(redis_url: str, stream: str, count: int) -> None:
    """``count`` dead letters in the store of ``stream``'s default consumer group."""
    client = Redis.from_url(redis_url)
    try:
        key = keys.dead_letters(keys.prefix(stream, "supersim-worker"))
        await DeadLetterStore(client, key, 1000).add(letters(count))
    finally:
        await client.aclose()


async def test_the_dead_letter_gauge_follows_the_store_not_only_this_process(
    redis: Redis,
) -> None:
    """The gauge is read from the store at start and every ``every`` seconds: it shows
    entries already there and follows deletions made elsewhere (``dlq delete``)."""
    metrics = Metrics()
    key = f"test:{uuid.uuid4().hex}:dlq"
    writer = DeadLetterStore(redis, key, 1000)
    await writer.add(letters(3))
    watched = DeadLetterStore(redis, key, 1000, metrics)

    def shown() -> float | None:
        value = metrics.registry.get_sample_value("supersim_dead_letter_length")
        return None if value is None else float(value)

    async with LengthGauge(watched, every=0.1):
        await until(_async(lambda: shown() == 3), 5, "the length at start")
        (first, *_) = await writer.list()
        await writer.delete([first.entry_id])
        await until(_async(lambda: shown() == 2), 5, "the length after a deletion elsewhere")
    assert metrics.gauges["dead_letter_length"] == 2


def _async(check: Callable[[], bool]) -> Callable[[], Any]:
    async def run() -> bool:
        return check()

    return run


async def test_metrics_move_while_a_stream_is_consumed(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """Counters move with the records read, lag reaches 0, and the probes answer 200; the
    dead-letter gauge shows what an earlier run left in the store."""
    stream = f"obs-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=2)
    await put(kinesalite_endpoint, stream, events(150))
    await left_by_an_earlier_run(redis_url, stream, 2)
    port = free_port()
    env = worker_env(kinesalite_endpoint, redis_url, stream, SUPERSIM_HTTP_PORT=str(port))
    process = start(env)
    try:

        async def consumed() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            status, text = await get(port, "/metrics")
            if status != 200:
                return None
            found = samples(text)
            lag = found.get("supersim_shard_millis_behind_latest", [])
            read = total(found, "supersim_records_read_total")
            if read == 150 and len(lag) == 2 and all(value == 0 for _, value in lag):
                return found
            return None

        found = await until(consumed, 60, "150 records read and lag 0 on both shards")
        assert total(found, "supersim_events_handled_total") == 150
        assert total(found, "supersim_dead_letter_length") == 2
        assert total(found, "supersim_get_records_calls_total") >= 2
        assert total(found, "supersim_checkpoint_writes_total") >= 2
        assert total(found, "supersim_handler_duration_seconds_count") >= 2
        assert found["supersim_build_info"][0][0]["version"]
        labels = {key for name, rows in found.items() for row, _ in rows for key in row}
        assert labels <= {
            "shard",
            "handler",
            "kind",
            "sink",
            "reason",
            "outcome",
            "status",
            "group",
            "version",
            "le",
        }
        assert (await get(port, "/healthz"))[0] == 200
        assert (await get(port, "/readyz"))[0] == 200
        assert await asyncio.to_thread(health, env) == 0
        assert await asyncio.to_thread(health, env, "--ready") == 0
    finally:
        await asyncio.to_thread(stop, process)
    assert await asyncio.to_thread(health, env) == 1  # nothing answers any more


async def test_readyz_follows_redis_away_and_back(kinesalite_endpoint: str) -> None:
    """/readyz turns 503 naming Redis while redis-server is stopped, and 200 once it is back."""
    redis: RedisServer = await asyncio.to_thread(servers.start_redis)
    stream = f"obs-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    port = free_port()
    env = worker_env(kinesalite_endpoint, redis.url, stream, SUPERSIM_HTTP_PORT=str(port))
    process = start(env)
    restarted: RedisServer | None = None
    try:

        async def ready() -> bool:
            return (await get(port, "/readyz"))[0] == 200

        await until(ready, 60, "ready after start")
        await asyncio.to_thread(redis.stop)

        async def unready() -> str | None:
            status, body = await get(port, "/readyz")
            return body if status == 503 else None

        body = await until(unready, 20, "unready while redis is stopped")
        assert "redis" in body
        assert (await get(port, "/healthz"))[0] == 200  # not a reason to restart the pod
        restarted = await asyncio.to_thread(servers.start_redis, port=redis.port)
        await until(ready, 30, "ready again once redis is back")
        assert process.poll() is None
    finally:
        await asyncio.to_thread(stop, process)
        if restarted is not None:
            await asyncio.to_thread(restarted.stop)


@pytest.mark.timeout(120)
async def test_a_hung_handler_trips_the_timeout_and_healthz_reports_it(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """A handler that never returns is cut off by SUPERSIM_HANDLER_TIMEOUT (counted, never
    dead-lettered), and /healthz reports the stuck shard once SUPERSIM_STALL_TIMEOUT passed."""
    stream = f"obs-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, events(5))
    port = free_port()
    env = worker_env(
        kinesalite_endpoint,
        redis_url,
        stream,
        SUPERSIM_HTTP_PORT=str(port),
        SUPERSIM_HANDLER_TIMEOUT="0.5",
        SUPERSIM_STALL_TIMEOUT="3",
        RECORDING_DELAY="3600",
    )
    process = start(env)
    try:

        async def unhealthy() -> str | None:
            status, body = await get(port, "/healthz")
            return body if status == 503 else None

        body = await until(unhealthy, 60, "/healthz reports the stuck shard")
        assert "still not handled" in body
        found = samples((await get(port, "/metrics"))[1])
        timeouts = found["supersim_handler_timeouts_total"]
        assert [labels["handler"] for labels, value in timeouts if value] == ["recording"]
        assert total(found, "supersim_records_dead_lettered_total") == 0
        assert await asyncio.to_thread(health, env) == 1
    finally:
        await asyncio.to_thread(stop, process)


class Reporting:
    """A handler with gauges: ``open_alerts{kind=<its name>}``, or a failure (``fails``)."""

    def __init__(self, name: str, value: float) -> None:
        self.name = name
        self.value = value
        self.fails: BaseException | None = None

    async def handle(self, batch: Batch) -> None:
        return None

    async def close(self) -> None:
        return None

    async def gauges(self) -> list[Gauge]:
        if self.fails is not None:
            raise self.fails
        return [Gauge("open_alerts", self.value, {"kind": self.name, "group": "HF1"})]


def readings(metrics: Metrics) -> dict[str, float]:
    """``supersim_open_alerts`` per kind, as /metrics serves it."""
    found = samples(generate_latest(metrics.registry).decode())
    return {labels["kind"]: value for labels, value in found.get("supersim_open_alerts", [])}


def failures(metrics: Metrics) -> dict[str, float]:
    found = samples(generate_latest(metrics.registry).decode())
    rows = found.get("supersim_handler_failures_total", [])
    return {labels["handler"]: value for labels, value in rows}


async def test_a_failing_gauges_call_keeps_the_other_handlers_readings() -> None:
    """When one handler's gauges() fails (an error, or a CancelledError of its own), the
    other handlers' readings are still updated, the failing one keeps its last readings
    (a handler that never answered has none), and each failure is logged and counted in
    supersim_handler_failures_total."""
    steady, flaky, broken = Reporting("steady", 1), Reporting("flaky", 2), Reporting("broken", 3)
    broken.fails = RuntimeError("store down")
    metrics = Metrics()

    async def caught_up() -> bool:
        return False

    ticker = Ticker([steady, flaky, broken], caught_up, metrics, interval=60)
    await ticker.read_gauges()
    assert readings(metrics) == {"steady": 1, "flaky": 2}
    steady.value, flaky.value = 5, 7
    flaky.fails = asyncio.CancelledError("a future it awaited was cancelled")
    with capture_logs() as logs:
        await ticker.read_gauges()
    assert readings(metrics) == {"steady": 5, "flaky": 2}, "flaky keeps its last reading"
    assert failures(metrics) == {"flaky": 1, "broken": 2}
    failed = [(e["handler"], e["method"]) for e in logs if e["event"] != "debug"]
    assert failed == [("flaky", "gauges"), ("broken", "gauges")]
    flaky.fails = None
    await ticker.read_gauges()
    assert readings(metrics) == {"steady": 5, "flaky": 7}


async def test_gauges_are_read_while_the_caught_up_check_fails_and_a_slow_one_is_cut_off() -> None:
    """The ticker reads the gauges even when it cannot tell whether the stream is caught
    up (Redis away), and a gauges() call slower than the handler timeout is cut off and
    counted, the others read all the same."""
    steady, slow = Reporting("steady", 4), Reporting("slow", 1)
    release = asyncio.Event()

    async def hang() -> list[Gauge]:
        await release.wait()
        return []

    slow.gauges = hang  # type: ignore[method-assign]  # this instance's gauges() hangs
    metrics = Metrics()

    async def caught_up() -> bool:
        raise ConnectionError("redis away")

    with capture_logs() as logs:
        async with Ticker([steady, slow], caught_up, metrics, interval=0.01, timeout=0.2):
            await until(lambda: _read(metrics), 5, "steady's reading")
    release.set()
    assert readings(metrics) == {"steady": 4}
    assert any(e["event"] == "ticker_round_failed" for e in logs)
    cut = [e["handler"] for e in logs if e["event"] == "handler_periodic_call_failed"]
    assert set(cut) == {"slow"}
    assert failures(metrics) == {"slow": len(cut)}, "each one counted"


async def _read(metrics: Metrics) -> bool:
    return bool(readings(metrics))
