"""Polling against enhanced fan-out: latency from PutRecord to handled, and worker CPU per record.

One 2-shard kinesalite stream, with the fan-out test server (``tests/fanout_server.py``)
in front of it. A producer puts one record every ``1 / RATE`` s (PutRecord, partition keys
spread over both shards) and notes the wall clock as each call starts. The worker runs as
a subprocess, ``supersim-worker run`` from ``LATEST`` with default settings but for its
handler, this module's ``latency`` handler, which notes in Redis the wall clock at which
each batch reaches it. One consumer group per mode, in turn, in the same run:

- polling at its defaults (``SUPERSIM_IDLE_INTERVAL=1``: a caught-up shard is read once a
  second), straight to kinesalite;
- polling at the whole read budget (``SUPERSIM_IDLE_INTERVAL=0.2``: 5 GetRecords a second
  per shard, nothing left for any other consumer of the stream), straight to kinesalite;
- enhanced fan-out (``SUPERSIM_RETRIEVAL=fanout``), through the test server.

After a warm-up, for ``WINDOW`` s: each record put in the window gives one latency (when
the handler got it, less when its PutRecord started); the worker's CPU (user + system,
from ``/proc``) over the window, divided by the records put in it, gives CPU per record.
The test server, kinesalite and redis-server run in other processes: their CPU is not the
worker's and is not counted.

What fan-out's latency includes here: the test server is not Kinesis. It reads each
subscribed shard from kinesalite with GetRecords every ``poll_interval`` (0.05 s) while
the shard has nothing new, then frames and sends an event; AWS pushes records on its own
(about 70 ms on average, by its documentation). So the fan-out figure is the server's
polling delay (up to 0.05 s), a GetRecords on kinesalite and an HTTP hop, then the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.handlers.base import Batch, HandlerContext

KEY = "fanout"
TITLE = "Fan-out against polling: latency from PutRecord to handled, worker CPU per record"
SHARDS = 2
RATE = 100.0
"""Records put per second (the whole stream)."""
WINDOW = 60.0
QUICK_WINDOW = 10.0
WARMUP = 5.0
"""Seconds after the first record is handled before the window opens."""
POLL_INTERVAL = 0.05
"""The test server's reads of a shard with nothing new (its default)."""
BENCH_DIR = Path(__file__).resolve().parent
TESTS_DIR = BENCH_DIR.parent

# --- the handler, run inside the worker --------------------------------------------------------
# Only the standard library and ``worker`` are imported at module level, so the worker
# that imports this handler loads nothing of the benchmark's own (servers, clients).


def handled_key(key_prefix: str) -> str:
    return f"{key_prefix}:bench:handled"


def batches_key(key_prefix: str) -> str:
    return f"{key_prefix}:bench:batches"


class LatencyHandler:
    """Notes when each event reached it (``event sid|wall clock``) and each batch's size,
    in one Redis round trip per batch."""

    name = "latency"

    def __init__(self, context: HandlerContext[Any]) -> None:
        self._redis = context.redis
        self._handled = handled_key(context.key_prefix)
        self._batches = batches_key(context.key_prefix)

    async def handle(self, batch: Batch) -> None:
        now = time.time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.rpush(self._handled, *[f"{event.event_sid}|{now}" for event in batch.events])
            pipe.rpush(self._batches, f"{now}|{len(batch)}")
            await pipe.execute()

    async def close(self) -> None:
        return None


def create(context: HandlerContext[Any]) -> LatencyHandler:
    return LatencyHandler(context)


# --- the benchmark -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    label: str
    group: str
    env: Mapping[str, str]
    fanout: bool


MODES = (
    Mode("polling, idle interval 1 s (default)", "bench-polling", {}, fanout=False),
    Mode(
        "polling, idle interval 0.2 s (whole read budget)",
        "bench-polling-fast",
        {"SUPERSIM_IDLE_INTERVAL": "0.2"},
        fanout=False,
    ),
    Mode("enhanced fan-out", "bench-fanout", {"SUPERSIM_RETRIEVAL": "fanout"}, fanout=True),
)


@dataclass(frozen=True)
class Result:
    mode: Mode
    records: int
    latencies: list[float]
    cpu: float
    batches: int
    load: float
    """The 1-minute load average as the window closed (other processes share the machine)."""

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Producer:
    """Starts a PutRecord every ``1 / rate`` s while running, each in its own task (so a
    slow call delays no other: the rate holds on a busy machine); ``put_at``: event sid →
    wall clock at which its PutRecord started."""

    MAX_IN_FLIGHT = 100

    def __init__(self, endpoint: str, stream: str, rate: float) -> None:
        self._endpoint = endpoint
        self._stream = stream
        self._period = 1.0 / rate
        self._seq = 0
        self._puts: set[asyncio.Task[None]] = set()
        self.put_at: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def running(self, first_seq: int) -> AsyncIterator[Producer]:
        from kinesis_support import kinesis_client

        self._seq = first_seq
        async with kinesis_client(self._endpoint) as client:
            task = asyncio.create_task(self._produce(client), name="fanout-bench-producer")
            try:
                yield self
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                for result in await asyncio.gather(*self._puts, return_exceptions=True):
                    if isinstance(result, BaseException):
                        raise result

    async def _produce(self, client: Any) -> None:
        import orjson
        from events import make_record

        rng = random.Random(15)
        due = time.monotonic()
        while True:
            if len(self._puts) >= self.MAX_IN_FLIGHT:
                raise SystemExit(f"{self.MAX_IN_FLIGHT} PutRecord calls in flight: too slow")
            self._seq += 1
            record = make_record("attachment.accepted", seq=self._seq)
            sid = str(orjson.loads(record)["id"])  # the event sid handlers see
            key = f"{rng.getrandbits(64):x}"
            self.put_at[sid] = time.time()
            put = asyncio.create_task(
                client.put_record(StreamName=self._stream, Data=record, PartitionKey=key)
            )
            self._puts.add(put)
            put.add_done_callback(self._done)
            due += self._period
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def _done(self, put: asyncio.Task[None]) -> None:
        if put.cancelled() or put.exception() is None:
            self._puts.discard(put)  # a failed one stays, to be raised on exit


async def _handled(redis_url: str, prefix: str) -> tuple[dict[str, float], list[float]]:
    """Event sid → when first handled; and each batch's time."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        raw = await client.lrange(handled_key(prefix), 0, -1)  # type: ignore[misc]
        raw_batches = await client.lrange(batches_key(prefix), 0, -1)  # type: ignore[misc]
    finally:
        await client.aclose()
    handled: dict[str, float] = {}
    for item in raw:
        sid, _, at = item.decode().partition("|")
        handled.setdefault(sid, float(at))
    return handled, [float(item.decode().partition("|")[0]) for item in raw_batches]


async def measure(
    mode: Mode, endpoint: str, redis_url: str, stream: str, window: float, first_seq: int
) -> Result:
    from worker import keys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(TESTS_DIR)]),
        SUPERSIM_STREAM_NAME=stream,
        SUPERSIM_ENDPOINT_URL=endpoint,
        SUPERSIM_REDIS_URL=redis_url,
        SUPERSIM_CONSUMER_GROUP=mode.group,
        SUPERSIM_HANDLERS="fanout_bench:create",
        SUPERSIM_LOG_FORMAT="json",
        **mode.env,
    )
    prefix = keys.prefix(stream, mode.group)
    producer = Producer(endpoint, stream, RATE)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "worker.log"
        worker = start_worker(env, log_path)
        try:
            async with producer.running(first_seq):
                started = time.monotonic()
                while not (await _handled(redis_url, prefix))[0]:
                    if worker.poll() is not None or time.monotonic() - started > 120:
                        raise SystemExit(f"worker never handled a record:\n{_tail(log_path)}")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(WARMUP)
                opened, cpu_before = time.time(), process_cpu(worker.pid)
                await asyncio.sleep(window)
                closed, cpu_after = time.time(), process_cpu(worker.pid)
                load = os.getloadavg()[0]
            in_window = {sid: at for sid, at in producer.put_at.items() if opened <= at < closed}
            for _ in range(100):  # until every record of the window is handled
                handled, batch_times = await _handled(redis_url, prefix)
                if in_window.keys() <= handled.keys():
                    break
                await asyncio.sleep(0.1)
            else:
                missing = len(in_window.keys() - handled.keys())
                raise SystemExit(f"{missing} records of the window never handled ({mode.label})")
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(worker.wait, 30)
            except subprocess.TimeoutExpired:
                worker.kill()
                await asyncio.to_thread(worker.wait)
    return Result(
        mode=mode,
        records=len(in_window),
        latencies=[handled[sid] - at for sid, at in in_window.items()],
        cpu=cpu_after - cpu_before,
        batches=sum(1 for at in batch_times if opened <= at < closed),
        load=load,
    )


def start_worker(env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """``supersim-worker run`` as a subprocess, its logs to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def fanout_server(upstream: str) -> Iterator[str]:
    """The fan-out test server in front of ``upstream``, in a process of its own (so its
    work delays neither the producer nor the measurements); its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH_DIR), str(TESTS_DIR)])}
    server = subprocess.Popen(
        [sys.executable, __file__, "serve", upstream],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().decode().strip()
        if not url.startswith("http://"):
            raise SystemExit("the fan-out test server did not start")
        yield url
    finally:
        assert server.stdin is not None
        server.stdin.close()  # it stops at end of input
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def serve(upstream: str) -> None:
    """Run the fan-out test server until standard input ends; print its URL first."""
    from fanout_server import FanOutServer

    async with FanOutServer(upstream, poll_interval=POLL_INTERVAL) as server:
        print(server.url, flush=True)
        await asyncio.to_thread(sys.stdin.read)


async def _run_all(window: float, kinesalite_url: str, redis_url: str) -> list[Result]:
    from kinesis_support import create_stream

    stream = "bench-fanout"
    await create_stream(kinesalite_url, stream, shards=SHARDS)
    results = []
    with fanout_server(kinesalite_url) as fanout_url:
        for number, mode in enumerate(MODES):
            endpoint = fanout_url if mode.fanout else kinesalite_url
            result = await measure(mode, endpoint, redis_url, stream, window, 1_000_000 * number)
            results.append(result)
    return results


def run(quick: bool = False) -> str:
    from servers import start_kinesalite, start_redis

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    window = QUICK_WINDOW if quick else WINDOW
    kinesalite = start_kinesalite()
    redis = start_redis()
    try:
        results = asyncio.run(_run_all(window, kinesalite.url, redis.url))
    finally:
        kinesalite.stop()
        redis.stop()
    rows = []
    for result in results:
        rows.append(
            f"| {result.mode.label} | {result.records:,} "
            f"| {statistics.median(result.latencies) * 1000:,.0f} "
            f"| {result.percentile(0.99) * 1000:,.0f} "
            f"| {max(result.latencies) * 1000:,.0f} "
            f"| {result.cpu / result.records * 1e6:,.0f} "
            f"| {result.records / max(1, result.batches):,.1f} | {result.load:.1f} |"
        )
    return (
        f"A {SHARDS}-shard kinesalite stream, {RATE:.0f} records/s put one PutRecord at a "
        "time (partition keys spread over the shards), the worker as a subprocess "
        "(`supersim-worker run` from LATEST, default settings but the handler: one Redis "
        "round trip per batch noting when it arrived), one consumer group per mode, in "
        f"turn, each measured over {window:.0f} s after a {WARMUP:.0f} s warm-up. Latency: "
        "from the start of a record's PutRecord to its handler call. CPU: the worker "
        "process's user + system time over the window, per record put in it. Polling "
        "reads kinesalite directly; fan-out goes through the test server, which itself "
        f"reads kinesalite every {POLL_INTERVAL} s while a shard has nothing new (AWS "
        "pushes on its own): its figure is that polling delay, a GetRecords and an HTTP "
        "hop, then the worker. Reproduce: `.venv/bin/python tests/bench/run.py fanout`.\n\n"
        "| Mode | records | p50 ms | p99 ms | max ms | worker CPU µs/record | records/batch "
        "| load |\n|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"] or len(sys.argv) != 3:
        raise SystemExit("usage: fanout_bench.py serve KINESALITE_URL (run.py runs the benchmark)")
    asyncio.run(serve(sys.argv[2]))
