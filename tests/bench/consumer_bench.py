"""End to end: ``supersim-worker run`` with the ``log`` handler over a pre-filled kinesalite stream.

A 4-shard kinesalite stream is filled with simulator records (≥100k), then the worker runs
as a subprocess with ``--from-start --until-caught-up``. Wall time gives records/s; the
child's user+system CPU time gives CPU µs per record (start-up included), beside the cost
of ``orjson.loads`` alone on the same records.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

import orjson
from kinesis_support import create_stream, put
from servers import start_kinesalite, start_redis

from worker.devtools.simulator import SimulationOptions, generate

KEY = "consumer"
TITLE = "End to end: `run` with the log handler"
SHARDS = 4


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(quick: bool = False) -> str:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    options = SimulationOptions(sims=60 if quick else 560, hours=24, seed=7)
    records, _ = generate(options)
    loads = min(timeit.repeat(lambda: [orjson.loads(r) for r in records], number=1, repeat=3))
    kinesalite = start_kinesalite()
    redis = start_redis()
    try:
        stream = "bench"
        asyncio.run(create_stream(kinesalite.url, stream, shards=SHARDS))
        started = time.perf_counter()
        asyncio.run(put(kinesalite.url, stream, records))
        put_seconds = time.perf_counter() - started
        env = {
            **os.environ,
            "SUPERSIM_STREAM_NAME": stream,
            "SUPERSIM_ENDPOINT_URL": kinesalite.url,
            "SUPERSIM_REDIS_URL": redis.url,
            "SUPERSIM_HANDLERS": "log",
            "SUPERSIM_LOG_FORMAT": "json",
            "SUPERSIM_BATCH_LIMIT": "10000",
            "SUPERSIM_IDLE_INTERVAL": "0.2",
        }
        with tempfile.TemporaryDirectory() as tmp:
            log_path = Path(tmp) / "worker.log"
            cpu_before = _child_cpu()
            started = time.perf_counter()
            with log_path.open("wb") as log:
                result = subprocess.run(
                    [sys.executable, "-m", "worker", "run", "--from-start", "--until-caught-up"],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    check=False,
                )
            wall = time.perf_counter() - started
            cpu = _child_cpu() - cpu_before
            if result.returncode != 0:
                raise SystemExit(f"worker failed:\n{log_path.read_text()[-3000:]}")
            handled = sum(
                orjson.loads(line).get("events", 0)
                for line in log_path.read_bytes().splitlines()
                if b'"event":"batch"' in line
            )
    finally:
        kinesalite.stop()
        redis.stop()
    count = len(records)
    if handled != count:
        raise SystemExit(f"worker handled {handled} events of {count} records")
    size = sum(len(r) for r in records) / count
    return (
        f"{count:,} simulator records (`--sims {options.sims} --hours 24 --seed 7`, "
        f"{size:,.0f} bytes on average) in a {SHARDS}-shard kinesalite stream (filled in "
        f"{put_seconds:.1f} s); the worker as a subprocess, `run --from-start --until-caught-up`, "
        "`SUPERSIM_HANDLERS=log`, `SUPERSIM_BATCH_LIMIT=10000`, JSON logs to a file. CPU is the "
        "child's user+system time, process start-up included.\n\n"
        "| What | figure |\n|---|---:|\n"
        f"| wall time | {wall:.2f} s |\n"
        f"| records/s | {count / wall:,.0f} |\n"
        f"| worker CPU µs per record | {cpu / count * 1e6:.1f} |\n"
        f"| `orjson.loads` alone, µs per record | {loads / count * 1e6:.2f} |\n"
        f"| worker CPU / `orjson.loads` | {cpu / loads:.1f} times |\n"
    )
