"""Memory under backlog: the worker's peak RSS while it drains a 100k and a 1M record backlog.

For each size a fresh kinesalite holds a 4-shard stream filled with that many connection
event records (every kind in turn, distinct event ids and SIMs), put shard by shard with
``ExplicitHashKey`` so the four fills overlap. The worker then runs as a subprocess,
``run --from-start --until-caught-up`` with the ``log`` handler and the largest batches
(``SUPERSIM_BATCH_LIMIT=10000``, prefetch at its default), until it has read all of it.
Its peak RSS is the kernel's high-water mark for that child (``wait4``'s ``ru_maxrss``);
its RSS is also sampled from ``/proc`` while it runs, to give the RSS once a quarter of
the records are read (start-up and the first batches behind it) beside the peak.

Read-ahead is bounded per shard (``SUPERSIM_PREFETCH_BATCHES`` batches queued, one being
handed over, one being handled), so the peak should not depend on how much waits: the
goal (issue 14) is a 1M backlog's peak within 20 % of a 100k backlog's. With
``BACKLOG_BENCH_BASELINE`` set, another version's worker reads each backlog too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from events import KINDS, make_record
from kinesis_support import create_stream, kinesis_client
from servers import start_kinesalite, start_redis

KEY = "backlog"
TITLE = "Memory under backlog: the worker's peak RSS, 100k against 1M records"
SHARDS = 4
SIZES = (100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
GOAL = 1.20
"""The larger backlog's peak RSS at most this many times the smaller's."""
PUT_BATCH = 500
"""Records per PutRecords call (the most Kinesis takes)."""
SAMPLE_EVERY = 0.1
"""Seconds between RSS samples of the running worker."""
REPO = Path(__file__).resolve().parents[2]
BASELINE_VARIABLE = "BACKLOG_BENCH_BASELINE"
"""Names a directory holding another version's ``worker`` package (an unpacked
``git archive``): its worker then drains every backlog too, right before this tree's, for
before/after figures from one run over the same records."""


@dataclass(frozen=True, slots=True)
class Drain:
    tree: str
    records: int
    put_seconds: float
    wall_seconds: float
    peak_rss_mib: float
    quarter_rss_mib: float
    """RSS at the first sample after a quarter of the records were handled."""


def records_for(shard: int, count: int) -> Iterator[bytes]:
    """The ``count`` records put on shard number ``shard`` (of ``SHARDS``), every kind in
    turn, each with its own event id and one of 997 SIMs."""
    for i in range(count):
        seq = i * SHARDS + shard
        yield make_record(
            KINDS[seq % len(KINDS)], seq=seq, fields={"data.sim_sid": f"HS{seq % 997:032x}"}
        )


async def fill(endpoint: str, stream: str, total: int) -> None:
    """Put ``total`` records, a quarter on each shard, the shards' puts concurrently."""
    async with kinesis_client(endpoint) as client:
        listed = await client.list_shards(StreamName=stream)
        hash_keys = [s["HashKeyRange"]["StartingHashKey"] for s in listed["Shards"]]
        assert len(hash_keys) == SHARDS, listed

        async def put_shard(shard: int, count: int) -> None:
            chunk: list[dict[str, Any]] = []
            for raw in records_for(shard, count):
                chunk.append(
                    {"Data": raw, "PartitionKey": "k", "ExplicitHashKey": hash_keys[shard]}
                )
                if len(chunk) == PUT_BATCH:
                    await _put(client, stream, chunk)
                    chunk = []
            if chunk:
                await _put(client, stream, chunk)

        share, extra = divmod(total, SHARDS)
        await asyncio.gather(
            *(put_shard(shard, share + (shard < extra)) for shard in range(SHARDS))
        )


async def _put(client: Any, stream: str, chunk: list[dict[str, Any]]) -> None:
    response = await client.put_records(StreamName=stream, Records=chunk)
    if response.get("FailedRecordCount"):
        raise SystemExit(f"kinesalite refused {response['FailedRecordCount']} records")


def _rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _handled(log_path: Path) -> int:
    """Events the log handler has logged so far (its ``batch`` lines)."""
    return sum(
        orjson.loads(line).get("events", 0)
        for line in log_path.read_bytes().splitlines()
        if b'"event":"batch"' in line
    )


def _trouble(log_path: Path) -> Counter[str]:
    """How many times the worker logged each warning or error event."""
    found: Counter[str] = Counter()
    for line in log_path.read_bytes().splitlines():
        if b'"level":"warning"' in line or b'"level":"error"' in line:
            found[orjson.loads(line).get("event", "?")] += 1
    return found


def measure(total: int, env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """Run the worker of the tree at ``cwd`` over the backlog until it has read it all:
    (wall seconds, peak RSS MiB, RSS MiB once a quarter of ``total`` was handled)."""
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "worker.log"
        with log_path.open("wb") as log:
            started = time.perf_counter()
            child = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", "--from-start", "--until-caught-up"],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            quarter: float | None = None
            while True:
                # wait4, not poll(): it gives this child's own rusage, whose ru_maxrss is
                # the kernel's high-water mark of its RSS.
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                rss = _rss_mib(child.pid)
                if quarter is None and rss is not None and _handled(log_path) >= total / 4:
                    quarter = rss
                time.sleep(SAMPLE_EVERY)
            wall = time.perf_counter() - started
            child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"worker failed:\n{log_path.read_text()[-3000:]}")
        handled, trouble = _handled(log_path), _trouble(log_path)
    if handled != total:
        raise SystemExit(
            f"worker handled {handled} events of {total} records; its warnings and errors: "
            f"{dict(trouble)}"
        )
    return wall, usage.ru_maxrss / 1024, quarter or float("nan")  # ru_maxrss: KiB on Linux


def drain(total: int, trees: dict[str, Path]) -> list[Drain]:
    """Fill a fresh stream with ``total`` records; the worker of each tree (name → the
    directory holding its ``worker`` package) reads it all, as a consumer group of its own."""
    kinesalite = start_kinesalite()
    redis = start_redis()
    try:
        stream = "backlog"
        asyncio.run(create_stream(kinesalite.url, stream, shards=SHARDS))
        started = time.perf_counter()
        asyncio.run(fill(kinesalite.url, stream, total))
        put_seconds = time.perf_counter() - started
        drains = []
        for name, tree in trees.items():
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")},
                "SUPERSIM_STREAM_NAME": stream,
                "SUPERSIM_CONSUMER_GROUP": f"backlog-{name.replace(' ', '-')}",
                "SUPERSIM_ENDPOINT_URL": kinesalite.url,
                "SUPERSIM_REDIS_URL": redis.url,
                "SUPERSIM_HANDLERS": "log",
                "SUPERSIM_LOG_FORMAT": "json",
                "SUPERSIM_BATCH_LIMIT": "10000",
                "SUPERSIM_IDLE_INTERVAL": "0.2",
                # A loaded machine can hold the event loop past a renewal while 10,000-record
                # batches are decoded; a longer lease keeps every record read exactly once.
                "SUPERSIM_LEASE_TTL": "30",
            }
            wall, peak, quarter = measure(total, env, tree)
            drains.append(Drain(name, total, put_seconds, wall, peak, quarter))
    finally:
        kinesalite.stop()
        redis.stop()
    return drains


def run(quick: bool = False) -> str:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    trees = {"this tree": REPO}
    baseline = os.environ.get(BASELINE_VARIABLE)
    if baseline:
        trees = {"baseline": Path(baseline).resolve(), **trees}
    small, large = QUICK_SIZES if quick else SIZES
    drains = drain(small, trees) + drain(large, trees)
    ratios = {
        name: next(d for d in drains if d.tree == name and d.records == large).peak_rss_mib
        / next(d for d in drains if d.tree == name and d.records == small).peak_rss_mib
        for name in trees
    }
    rows = "".join(
        f"| {d.tree} | {d.records:,} | {d.put_seconds:.1f} | {d.wall_seconds:.1f} "
        f"| {d.records / d.wall_seconds:,.0f} | {d.quarter_rss_mib:.1f} | {d.peak_rss_mib:.1f} |\n"
        for d in sorted(drains, key=lambda d: (d.tree != "baseline", d.records))
    )
    ratio = ratios["this tree"]
    verdict = "met" if ratio <= GOAL else "not met"
    others = "".join(
        f" The baseline (`{BASELINE_VARIABLE}`), drained the same backlogs in the same run: "
        f"{value:.2f}."
        for name, value in ratios.items()
        if name != "this tree"
    )
    return (
        f"A {SHARDS}-shard kinesalite stream per size (a fresh server each), filled with "
        "connection event records of every kind in turn (1.0 to 1.5 KB), then read by "
        "`supersim-worker run --from-start --until-caught-up` as a subprocess with "
        "`SUPERSIM_HANDLERS=log`, `SUPERSIM_BATCH_LIMIT=10000`, the default "
        "`SUPERSIM_PREFETCH_BATCHES` (2), `SUPERSIM_LEASE_TTL=30`, JSON logs to a file. "
        "Peak RSS is the worker's high-water mark (`wait4`'s `ru_maxrss`); \"RSS at ¼\" is "
        "its RSS when a quarter of the records had been handled.\n\n"
        "| worker | backlog (records) | fill s | drain wall s | records/s | RSS at ¼ MiB "
        "| peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n"
        f"**Peak RSS {large:,} / {small:,} = {ratio:.2f}** (goal ≤ {GOAL:.2f}: {verdict})."
        f"{others}\n"
    )
