"""Side by side: our ``run`` (``log`` handler) and async-kinesis, on the same streams, in one run.

The peer is async-kinesis 3.0.1 with its ``RedisCheckPointer``, decoding with orjson and
doing nothing else (``peer_consumer.py``), in a virtualenv of its own made from PyPI under
the system temp dir and reused while its requirements and ours are unchanged (``peer_python``);
the libraries both depend on (aiobotocore, botocore, aiohttp, redis, hiredis, orjson) are
pinned to the versions our virtualenv has, so the comparison is of the consumers' own code.
Ours also reads the full stream with every built-in handler (``ALL_HANDLERS``), for the
whole product's worker and Redis CPU per record.

Three 4-shard kinesalite streams: ``full`` (simulator records, partition key the SIM),
``idle`` (a quarter of them, all on one shard: 3 of 4 shards idle) and ``empty``. Each
round runs each consumer as a child process from TRIM_HORIZON on each stream, one process
at a time, ours first in even rounds and the peer first in odd ones (``idle`` in the first
round only: the peer pauses 2 s after each empty read, so it is the slowest run). Figures:

- **CPU** is the child's user+system time from exec to exit (``RUSAGE_CHILDREN``).
- **Start-up** is the CPU of the run over ``empty``: start, connect, list shards, take the
  shards (leases or the checkpointer's locks), read each shard once, stop.
- **Steady state** is (CPU over ``full`` - start-up) / records.
- **records/s** is records / (wall time over ``full`` - wall time over ``empty``), and
  **to the first record** is when the first record reached the consumer's code (the marks
  of ``worker_probe.py`` and ``peer_consumer.py``).
- **Redis CPU** and **kinesalite CPU** are those servers' own CPU over the run (``INFO
  cpu``; ``/proc``), per record.

Wall time measures kinesalite as much as the consumers; CPU per record is the figure to compare.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

import orjson
import redis
from kinesis_support import create_stream, put, put_to_shard
from servers import KinesaliteServer, RedisServer, start_kinesalite, start_redis

from worker.devtools.simulator import SimulationOptions, generate

KEY = "peer"
TITLE = "Side by side: our `run` (log handler) and async-kinesis on the same stream"
SHARDS = 4
ROUNDS = 3
CHILD_TIMEOUT = 600.0
BENCH_DIR = Path(__file__).resolve().parent
PEER_REQUIREMENTS = ("async-kinesis[redis]==3.0.1", "orjson", "hiredis")
OURS, PEER, BASELINE, ALL = "ours", "peer", "baseline", "all"
ALL_HANDLERS = "log,metering,rejections,data_limit,attach_loops"
"""Ours again with every built-in handler (``log`` too, for the probe's marks): the cost of
the whole product per record, worker and Redis (issue 14's goals: 40 and 10 µs)."""
BASELINE_VARIABLE = "PEER_BENCH_BASELINE"
"""Names a directory holding another version's ``worker`` package (an unpacked
``git archive``): its worker then reads the full stream too in every round, for
before/after figures from one run (not the idle case)."""


# --- the peer's virtualenv --------------------------------------------------------------------


def _our_pins() -> list[str]:
    """``name==version`` of every distribution in this interpreter installed from an index
    (editable and local ones left out): constraints, so the peer gets the same libraries."""
    pins = set()
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and dist.read_text("direct_url.json") is None:
            pins.add(f"{name}=={dist.version}")
    return sorted(pins)


def peer_python() -> Path:
    """The Python of the peer's virtualenv, made (once per set of requirements) with
    ``python -m venv`` and pip from PyPI."""
    pins = _our_pins()
    digest = hashlib.sha256(
        "\n".join([sys.version, *PEER_REQUIREMENTS, *pins]).encode()
    ).hexdigest()[:12]
    venv = Path(tempfile.gettempdir()) / f"supersim-bench-peer-{digest}"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    print(f"making the peer's virtualenv in {venv} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *PEER_REQUIREMENTS,
            "-c",
            str(constraints),
        ],
        check=True,
    )
    ready.touch()
    return python


def _peer_versions(python: Path) -> str:
    code = (
        "from importlib.metadata import version as v\n"
        "print(', '.join(f'{n} {v(n)}' for n in "
        "('async-kinesis', 'aiobotocore', 'redis', 'orjson')))"
    )
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, check=True, text=True
    ).stdout.strip()


def our_env(
    base: dict[str, str],
    stream: str,
    endpoint: str,
    redis_url: str,
    group: str,
    handlers: str = "log",
) -> dict[str, str]:
    """The environment our worker runs with: the ``log`` handler (or ``handlers``), 10,000
    records a read."""
    return {
        **{k: v for k, v in base.items() if not k.startswith("SUPERSIM_")},
        "SUPERSIM_STREAM_NAME": stream,
        "SUPERSIM_ENDPOINT_URL": endpoint,
        "SUPERSIM_REDIS_URL": redis_url,
        "SUPERSIM_CONSUMER_GROUP": group,
        "SUPERSIM_HANDLERS": handlers,
        "SUPERSIM_LOG_FORMAT": "json",
        "SUPERSIM_BATCH_LIMIT": "10000",
        "SUPERSIM_IDLE_INTERVAL": "0.2",
    }


# --- one run ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    records: int
    cpu: float
    """The child's user+system seconds, exec to exit."""
    redis_cpu: float
    kinesalite_cpu: float
    wall: float
    first: tuple[float, float] | None
    """(CPU s, s since the child started) when the first record reached the consumer's code."""
    gc_cpu: float = float("nan")
    """CPU s in garbage collection after the first record (ours only: ``worker_probe``)."""
    max_rss_kib: int = 0
    """The child's peak resident set size (ours only: ``worker_probe``; 0 when unknown)."""


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _redis_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _process_cpu(pid: int) -> float:
    """User+system seconds of a running process (Linux ``/proc``; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(
    argv: Sequence[str],
    env: dict[str, str],
    expected: int,
    redis_client: redis.Redis,
    kinesalite: KinesaliteServer,
) -> Run:
    """Run one consumer to the end and measure it; raises if it fails or miscounts."""
    with tempfile.TemporaryDirectory() as tmp:
        marks_path = Path(tmp) / "marks.json"
        log_path = Path(tmp) / "stderr.log"
        cpu, redis_cpu = _child_cpu(), _redis_cpu(redis_client)
        kinesalite_cpu = _process_cpu(kinesalite.process.pid)
        started = time.perf_counter()
        with log_path.open("wb") as log:
            result = subprocess.run(
                [argv[0], argv[1], str(marks_path), *argv[2:]],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                timeout=CHILD_TIMEOUT,
                check=False,
            )
        wall = time.perf_counter() - started
        cpu = _child_cpu() - cpu
        redis_cpu = _redis_cpu(redis_client) - redis_cpu
        kinesalite_cpu = _process_cpu(kinesalite.process.pid) - kinesalite_cpu
        if result.returncode != 0 or not marks_path.exists():
            raise SystemExit(
                f"{' '.join(argv)} exited {result.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        marks = orjson.loads(marks_path.read_bytes())
    if marks["records"] != expected:
        raise SystemExit(f"{' '.join(argv)}: {marks['records']} records, expected {expected}")

    def since_start(mark: list[float] | None) -> tuple[float, float] | None:
        # perf_counter is CLOCK_MONOTONIC on Linux: one clock for parent and child.
        return None if mark is None else (mark[0], mark[1] - started)

    return Run(
        records=expected,
        cpu=cpu,
        redis_cpu=redis_cpu,
        kinesalite_cpu=kinesalite_cpu,
        wall=wall,
        first=since_start(marks.get("first")),
        gc_cpu=marks["gc"][1] if "gc" in marks else float("nan"),
        max_rss_kib=marks.get("max_rss_kib", 0),
    )


# --- the benchmark ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """One consumer in one round."""

    startup: Run
    full: Run
    idle: Run | None

    def steady_us(self, run: Run) -> float:
        return (run.cpu - self.startup.cpu) / run.records * 1e6

    def rate(self, run: Run) -> float:
        return run.records / (run.wall - self.startup.wall)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(quick: bool = False) -> str:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    rounds = 1 if quick else ROUNDS
    python = peer_python()
    peer_versions = _peer_versions(python)
    options = SimulationOptions(sims=60 if quick else 560, hours=24, seed=7)
    records, _ = generate(options)
    idle_records = records[: len(records) // 4]
    loads = min(timeit.repeat(lambda: [orjson.loads(r) for r in records], number=1, repeat=3))
    kinesalite = start_kinesalite()
    redis_server = start_redis()
    try:
        streams = {"full": "bench-full", "idle": "bench-idle", "empty": "bench-empty"}
        for stream in streams.values():
            asyncio.run(create_stream(kinesalite.url, stream, shards=SHARDS))
        began = time.perf_counter()
        asyncio.run(put(kinesalite.url, streams["full"], records))
        fill_seconds = time.perf_counter() - began
        asyncio.run(put_to_shard(kinesalite.url, streams["idle"], idle_records, "0"))
        results = _measure(
            rounds, python, streams, len(records), len(idle_records), kinesalite, redis_server
        )
    finally:
        kinesalite.stop()
        redis_server.stop()
    return _report(results, options, records, idle_records, loads, fill_seconds, peer_versions)


def _measure(
    rounds: int,
    python: Path,
    streams: dict[str, str],
    count: int,
    idle_count: int,
    kinesalite: KinesaliteServer,
    redis_server: RedisServer,
) -> list[dict[str, Figures]]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    client = redis.Redis.from_url(redis_server.url)

    def ours(stream: str, expected: int, tag: str) -> Run:
        env = our_env(base_env, stream, kinesalite.url, redis_server.url, tag)
        argv = [sys.executable, str(BENCH_DIR / "worker_probe.py")]
        argv += ["run", "--from-start", "--until-caught-up"]
        return run_child(argv, env, expected, client, kinesalite)

    def peer(stream: str, expected: int, tag: str) -> Run:
        env = {**base_env, "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(redis_server.port)}
        env.pop("PYTHONPATH", None)
        argv = [str(python), str(BENCH_DIR / "peer_consumer.py")]
        argv += [kinesalite.url, stream, str(expected)]
        return run_child(argv, env, expected, client, kinesalite)

    def every_handler(stream: str, expected: int, tag: str) -> Run:
        env = our_env(base_env, stream, kinesalite.url, redis_server.url, f"{tag}a", ALL_HANDLERS)
        argv = [sys.executable, str(BENCH_DIR / "worker_probe.py")]
        argv += ["run", "--from-start", "--until-caught-up"]
        return run_child(argv, env, expected, client, kinesalite)

    def baseline(stream: str, expected: int, tag: str) -> Run:
        env = our_env(base_env, stream, kinesalite.url, redis_server.url, f"{tag}b")
        env["PYTHONPATH"] = os.environ[BASELINE_VARIABLE]
        argv = [sys.executable, str(BENCH_DIR / "worker_probe.py")]
        argv += ["run", "--from-start", "--until-caught-up"]
        return run_child(argv, env, expected, client, kinesalite)

    consumers: dict[str, Callable[[str, int, str], Run]] = {
        OURS: ours,
        PEER: peer,
        ALL: every_handler,
    }
    if os.environ.get(BASELINE_VARIABLE):
        consumers[BASELINE] = baseline
    results = []
    try:
        for number in range(rounds):
            order = tuple(consumers) if number % 2 == 0 else tuple(reversed(consumers))
            figures = {}
            for name in order:
                consume = consumers[name]
                tag = f"bench{number}"
                print(f"round {number + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
                startup = consume(streams["empty"], 0, f"{tag}e")
                full = consume(streams["full"], count, f"{tag}f")
                idle = (
                    consume(streams["idle"], idle_count, f"{tag}i")
                    if not number and name not in (BASELINE, ALL)
                    else None
                )
                figures[name] = Figures(startup, full, idle)
            results.append(figures)
    finally:
        client.close()
    return results


def _report(
    results: list[dict[str, Figures]],
    options: SimulationOptions,
    records: Sequence[bytes],
    idle_records: Sequence[bytes],
    loads: float,
    fill_seconds: float,
    peer_versions: str,
) -> str:
    count = len(records)

    def med(name: str, figure: Callable[[Figures], float]) -> float:
        values = [figure(r[name]) for r in results]
        return _median([value for value in values if not math.isnan(value)])

    def first_cpu(f: Figures) -> float:
        return f.full.first[0] if f.full.first else float("nan")

    def first_wall(f: Figures) -> float:
        return f.full.first[1] if f.full.first else float("nan")

    def idle_steady(f: Figures) -> float:
        return f.steady_us(f.idle) if f.idle else float("nan")

    def idle_rate(f: Figures) -> float:
        return f.rate(f.idle) if f.idle else float("nan")

    rows: list[tuple[str, Callable[[Figures], float], str]] = [
        ("steady-state CPU µs per record", lambda f: f.steady_us(f.full), "{:.1f}"),
        ("records/s in steady state", lambda f: f.rate(f.full), "{:,.0f}"),
        ("start-up CPU s (empty stream, exec to exit)", lambda f: f.startup.cpu, "{:.2f}"),
        ("CPU s to the first record (full stream)", first_cpu, "{:.2f}"),
        ("wall s to the first record", first_wall, "{:.2f}"),
        (
            "total CPU µs per record (start-up included)",
            lambda f: f.full.cpu / count * 1e6,
            "{:.1f}",
        ),
        ("Redis CPU µs per record", lambda f: f.full.redis_cpu / count * 1e6, "{:.2f}"),
        ("kinesalite CPU µs per record", lambda f: f.full.kinesalite_cpu / count * 1e6, "{:.1f}"),
        ("3 of 4 shards idle: steady-state CPU µs per record", idle_steady, "{:.1f}"),
        ("3 of 4 shards idle: records/s", idle_rate, "{:,.0f}"),
    ]
    table = "".join(
        f"| {label} | {fmt.format(med(OURS, figure))} | {fmt.format(med(PEER, figure))} "
        f"| {med(OURS, figure) / med(PEER, figure):.2f} |\n"
        for label, figure, fmt in rows
    )
    ratios = [r[OURS].steady_us(r[OURS].full) / r[PEER].steady_us(r[PEER].full) for r in results]
    per_round = "; ".join(
        f"{r[OURS].steady_us(r[OURS].full):.1f} against {r[PEER].steady_us(r[PEER].full):.1f} µs"
        f" ({ratio:.2f})"
        for r, ratio in zip(results, ratios, strict=True)
    )
    ratio = _median(ratios)
    goal = "met" if ratio <= 1 / 3 else "not met"
    before = ""
    if BASELINE in results[0]:
        pairs = [
            (r[BASELINE].steady_us(r[BASELINE].full), r[OURS].steady_us(r[OURS].full))
            for r in results
        ]

        def steady(f: Figures) -> float:
            return f.steady_us(f.full)

        gc_pairs = [
            (r[BASELINE].full.gc_cpu / count * 1e6, r[OURS].full.gc_cpu / count * 1e6)
            for r in results
        ]
        before = (
            f"Before and after in the same rounds (`{BASELINE_VARIABLE}`: another version's "
            "worker read the full stream too), steady-state CPU µs per record, before against "
            "after: "
            + "; ".join(f"{old:.1f} against {new:.1f} ({new / old:.2f})" for old, new in pairs)
            + f". Median before / peer: {med(BASELINE, steady) / med(PEER, steady):.2f}. "
            "Of that, garbage collection, µs per record, before against after: "
            + "; ".join(f"{old:.1f} against {new:.1f}" for old, new in gc_pairs)
            + ".\n\n"
        )
    all_cpu = med(ALL, lambda f: f.steady_us(f.full))
    all_redis = med(ALL, lambda f: f.full.redis_cpu / count * 1e6)
    every = (
        f"Ours with every built-in handler (`SUPERSIM_HANDLERS={ALL_HANDLERS}`, the "
        "same settings as ours otherwise, each round's run in a consumer group of its own, so every run "
        "meters and alerts from scratch; a run ends caught up, so it ticks the alert handlers "
        "once as it exits, and the Redis figure includes walking every stored hit of the "
        "stream: the alert detection itself, which a run ending within the handlers' 30 s "
        "warm-up did not do before it had that tick), medians of the same rounds:\n\n"
        "| figure | all handlers | goal |\n|---|---:|---:|\n"
        f"| steady-state worker CPU µs per record | {all_cpu:.1f} | ≤ 40 "
        f"({'met' if all_cpu <= 40 else 'not met'}) |\n"
        f"| Redis CPU µs per record | {all_redis:.1f} | ≤ 10 "
        f"({'met' if all_redis <= 10 else 'not met'}) |\n"
        f"| records/s in steady state | {med(ALL, lambda f: f.rate(f.full)):,.0f} | |\n"
        f"| garbage collection CPU µs per record | {med(ALL, lambda f: f.full.gc_cpu / count * 1e6):.1f} | |\n"
        f"| start-up CPU s (empty stream) | {med(ALL, lambda f: f.startup.cpu):.2f} | |\n\n"
    )
    size = sum(len(r) for r in records) / count
    return (
        f"{count:,} simulator records (`--sims {options.sims} --hours {options.hours} "
        f"--seed {options.seed}`, {size:,.0f} bytes on average) in a {SHARDS}-shard kinesalite "
        f"stream (filled in {fill_seconds:.1f} s, partition key the SIM); for the idle case "
        f"the first {len(idle_records):,} of them all on one shard of another {SHARDS}-shard "
        f"stream. Peer: {peer_versions}, in its own virtualenv; `RedisCheckPointer`, "
        "records parsed with `orjson.loads`, nothing else, the library's defaults otherwise "
        "(one GetRecords per shard and second, a 2 s pause after an empty read). Ours: "
        "`supersim-worker run --from-start --until-caught-up` with `SUPERSIM_HANDLERS=log`, "
        "`SUPERSIM_BATCH_LIMIT=10000`, `SUPERSIM_IDLE_INTERVAL=0.2`, JSON logs to a file "
        "(`tests/bench/worker_probe.py`). Both read 10,000 records per GetRecords at most, "
        "one process at a time, against the same kinesalite and redis-server. "
        f"Medians of {len(results)} round(s) (the idle case: the first round only); "
        "`orjson.loads` alone costs "
        f"{loads / count * 1e6:.2f} µs per record here.\n\n"
        "| figure | ours | async-kinesis | ours / peer |\n|---|---:|---:|---:|\n"
        f"{table}\n"
        f"Steady-state CPU per record, ours against the peer's, per round: {per_round}. "
        "Of ours, garbage collection after the first record (`gc.callbacks` in "
        f"`worker_probe.py`): {med(OURS, lambda f: f.full.gc_cpu / count * 1e6):.1f} µs per "
        "record.\n\n"
        f"{before}"
        f"{every}"
        f"**Ours / peer = {ratio:.2f}** in steady state (goal ≤ 0.33: {goal}).\n"
    )
