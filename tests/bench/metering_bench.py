"""Metering cost: CPU per event (worker and Redis), Redis round trips per batch, and Redis
memory per SIM, measured with simulated fleets against a real redis-server.

1. **Throughput**: a simulated fleet (updated+ended, 5% duplicates, both vendors), decoded
   up front, handed to one ``metering`` handler in batches of ``BATCH`` events. Worker CPU
   is ``time.process_time`` around ``handle`` (encoding, JSON, the client's send and
   parse); Redis CPU is the server's ``used_cpu_user + used_cpu_sys`` delta; round trips
   are the commands the handler's connection sends.
2. **Memory for 100k SIMs**: 100,000 SIMs (ten simulated fleets of 10,000) for one hour;
   ``used_memory`` delta per SIM, and per key family from ``MEMORY USAGE``.
3. **Steady state**: a smaller fleet over several days gives the bytes each key family
   adds per SIM and UTC day; projected over the default retention (``MeteringSettings``:
   hourly buckets 35 days, daily buckets 400 days, session records 30 days), and over
   shorter session retentions.

The "before" figures are those of the previous key layout (commit ``BEFORE_COMMIT``),
measured with this benchmark on the same simulated streams; memory figures depend only on
the data, not on the machine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
import servers  # noqa: E402 - tests/ is put on sys.path just above
import structlog  # noqa: E402

from worker.devtools.simulator import SimulationOptions, generate  # noqa: E402
from worker.events.decode import decode  # noqa: E402
from worker.events.records import ConnectionEvent  # noqa: E402
from worker.handlers.base import Batch  # noqa: E402
from worker.handlers.metering.handler import MeteringHandler  # noqa: E402
from worker.handlers.metering.settings import MeteringSettings  # noqa: E402

KEY = "metering"
TITLE = "Metering: CPU per event, Redis round trips per batch, memory per SIM"
BATCH = 1000
PREFIX = "{sw:bench:metering}"
FAMILIES = {
    ":m:h:": "hourly buckets",
    ":m:d:": "daily buckets",
    ":m:r:": "session records",
    ":m:s:": "session records (previous layout)",
}
GOAL_ROUND_TRIPS = 1.0
GOAL_KIB_PER_SIM = 32
SESSION_DAYS = (30, 14, 7)
"""Shorter session retentions the steady state is also projected over."""

BEFORE_COMMIT = "f4c953f"
BEFORE: dict[str, float] = {
    "bytes per SIM (100k SIMs, one hour)": 1027,
    "hourly buckets per SIM-day": 501,
    "daily buckets per SIM-month (full)": 888,
    "session records per SIM-day": 2670,
    "KiB per SIM at the default retention": 107,
}
"""The previous layout's figures (``tests/bench/run.py metering --no-write`` on
``BEFORE_COMMIT``, 2026-12-06; the same simulated streams)."""
BEFORE_SESSION_DAYS = 30

REDIS_WORK = (
    "Redis CPU time on a shared machine moves by tens of percent from run to run, so the "
    "script's work was also counted in instructions (redis-server under "
    "`valgrind --tool=callgrind`, counters zeroed after the script was loaded, then the first "
    "10,000 connection events of a simulated stream of 400 SIMs over 8 hours, seed 11, 5% "
    "duplicates, 30% KORE envelopes, batches of 1,000; 7,260 of them data-session events): "
    "**123,514 instructions per event with the previous layout (`041c1c9`), 119,318 now** "
    "(-3.4%). The packed records alone cost 135,463 (+9.7%); dropping copies identical to an "
    "earlier event of the batch in the worker, and summing the fleet, account and network "
    "buckets per (hour, fleet, account, network) before expanding them, brought it below "
    "the previous layout. Where the instructions go (callgrind, packed layout): JSON "
    "decoding of the batch 13%, Redis commands called by the script 13%, the rest the Lua "
    "interpreter running the per-event logic."
)
"""Instruction counts of the script, before and after (measured separately: the bench
runs one layout)."""


@dataclass
class Run:
    events: int = 0
    usage_events: int = 0
    batches: int = 0
    worker_cpu: float = 0.0
    redis_cpu: float = 0.0
    wall: float = 0.0
    round_trips: int = 0
    first_batch_round_trips: int = 0


def fleet(options: SimulationOptions) -> list[ConnectionEvent]:
    records, _ = generate(options)
    return [e for e in map(decode, records) if isinstance(e, ConnectionEvent)]


def cut(events: list[ConnectionEvent]) -> Iterator[Batch]:
    for i in range(0, len(events), BATCH):
        yield Batch("shardId-000000000000", events[i : i + BATCH])


def redis_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def meter(url: str, events: list[ConnectionEvent], run: Run) -> None:
    """Hand ``events`` to a fresh handler in batches, adding the costs to ``run``."""
    connection = redis.asyncio.Redis.from_url(url)
    sent: list[str] = []
    original = connection.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return await original(*args, **options)

    connection.execute_command = counting  # type: ignore[method-assign]
    handler = MeteringHandler(connection, PREFIX, MeteringSettings())
    sync = redis.Redis.from_url(url)
    try:
        before = redis_cpu(sync)
        started = time.perf_counter()
        for number, batch in enumerate(cut(events)):
            cpu = time.process_time()
            await handler.handle(batch)
            run.worker_cpu += time.process_time() - cpu
            if number == 0:
                run.first_batch_round_trips = len(sent)
            run.batches += 1
        run.wall += time.perf_counter() - started
        run.redis_cpu += redis_cpu(sync) - before
    finally:
        sync.close()
        await connection.aclose()
    run.events += len(events)
    run.usage_events += sum(e.kind.carries_usage for e in events)
    run.round_trips += len(sent)


def family_of(key: bytes) -> str:
    """The key family of a metering key: buckets of SIMs, buckets shared by many SIMs
    (fleet, account, network), or session records."""
    text = key.decode()[len(PREFIX) :]
    family = FAMILIES[text[:5]]
    if text[:5] in (":m:h:", ":m:d:") and text[5:7] != "s:":
        family += " (fleet, account, network)"
    return family


def family_bytes(client: redis.Redis) -> dict[str, int]:
    """MEMORY USAGE summed per key family."""
    totals: dict[str, int] = defaultdict(int)
    keys = list(client.scan_iter(match=PREFIX + ":m:*", count=10_000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    for key, size in zip(keys, pipe.execute(), strict=True):
        totals[family_of(key)] += size or 0
    return dict(totals)


def encodings(client: redis.Redis) -> dict[str, int]:
    """How many metering hashes Redis keeps in each encoding (listpack is the compact one)."""
    keys = list(client.scan_iter(match=PREFIX + ":m:*", count=10_000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.object("encoding", key)
    counts: dict[str, int] = defaultdict(int)
    for found in pipe.execute():
        counts[found.decode()] += 1
    return dict(counts)


def full_month(client: redis.Redis) -> int:
    """MEMORY USAGE of one SIM's daily-bucket hash holding all 31 days: a copy of a real
    one (same key length, its largest value) filled with every day (fields ``D`` and
    ``D + 100``, bytes down and up)."""
    key = next(client.scan_iter(match=PREFIX + ":m:d:s:*", count=10_000))
    largest = max(int(v) for v in client.hvals(key))
    copy = key[:-6] + b"299912"
    client.hset(copy, mapping={day + up: largest for day in range(1, 32) for up in (0, 100)})
    size = int(client.memory_usage(copy, samples=0) or 0)
    client.delete(copy)
    return size


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def throughput(url: str, sims: int, hours: float) -> tuple[Run, str]:
    events = fleet(
        SimulationOptions(sims=sims, hours=hours, seed=11, duplicate_share=0.05, kore_share=0.3)
    )
    run = Run()
    asyncio.run(meter(url, events, run))
    return run, f"{sims:,} SIMs over {hours:g} h"


def hundred_k(url: str, client: redis.Redis, sims: int) -> tuple[int, dict[str, int]]:
    client.flushall()
    base = used_memory(client)
    slice_size = min(sims, 10_000)
    run = Run()
    for seed in range(sims // slice_size):
        events = fleet(SimulationOptions(sims=slice_size, hours=1, seed=100 + seed))
        asyncio.run(meter(url, events, run))
        del events
    return used_memory(client) - base, family_bytes(client)


@dataclass
class SteadyState:
    per_sim_day: dict[str, float]
    """Bytes per SIM and UTC day of activity, per key family."""
    full_month: int
    """Bytes of one SIM's daily-bucket hash holding a whole month."""
    sessions_per_sim_day: float
    encodings: dict[str, int]
    """Metering hashes per Redis encoding, at Redis' default thresholds."""


def per_day(url: str, client: redis.Redis, sims: int, days: int) -> SteadyState:
    events = fleet(SimulationOptions(sims=sims, hours=24 * days, seed=31))
    client.flushall()
    asyncio.run(meter(url, events, Run()))
    sizes = {family: size / sims / days for family, size in family_bytes(client).items()}
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=PREFIX + ":m:r:*", count=10_000):
        pipe.hkeys(key)
    sessions = sum(sum(not f.startswith(b"~") for f in fields) for fields in pipe.execute())
    return SteadyState(sizes, full_month(client), sessions / sims / days, encodings(client))


def run(quick: bool = False) -> str:
    if not structlog.is_configured():  # the handler's per-batch debug lines would flood
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    server = servers.start_redis()
    try:
        client = redis.Redis.from_url(server.url)
        speed, speed_what = throughput(server.url, 300 if quick else 2_000, 6 if quick else 12)
        sims = 10_000 if quick else 100_000
        memory, families = hundred_k(server.url, client, sims)
        days = 2 if quick else 3
        steady = per_day(server.url, client, 200 if quick else 1_000, days)
        version = client.info("server")["redis_version"]
        client.close()
    finally:
        server.stop()
    return report(speed, speed_what, sims, memory, families, steady, days, version)


def report(
    speed: Run,
    speed_what: str,
    sims: int,
    memory: int,
    families: dict[str, int],
    steady: SteadyState,
    days: int,
    version: str,
) -> str:
    per_event = speed.worker_cpu / speed.events * 1e6
    per_usage = speed.worker_cpu / speed.usage_events * 1e6
    redis_per_event = speed.redis_cpu / speed.events * 1e6
    redis_per_usage = speed.redis_cpu / speed.usage_events * 1e6
    later = (speed.round_trips - speed.first_batch_round_trips) / max(speed.batches - 1, 1)
    verdict = "met" if later <= GOAL_ROUND_TRIPS else "not met"
    lines = [
        f"redis-server {version}; batches of {BATCH:,} events; "
        f"handler `worker.handlers.metering.handler` (one `EVALSHA` of `metering.lua` per batch).",
        "",
        f"### Throughput ({speed_what}, {speed.events:,} connection events, "
        f"{speed.usage_events:,} updated/ended)",
        "",
        "| Figure | Value |",
        "|---|---:|",
        f"| Worker CPU per event | {per_event:.1f} µs |",
        f"| Worker CPU per updated/ended event | {per_usage:.1f} µs |",
        f"| Redis CPU per event | {redis_per_event:.1f} µs |",
        f"| Redis CPU per updated/ended event | {redis_per_usage:.1f} µs |",
        f"| Events per second (one handler, wall) | {speed.events / speed.wall:,.0f} |",
        f"| Redis round trips per batch (after the first) | {later:.2f} |",
        f"| Round trips of the first batch (`EVALSHA` answered `NOSCRIPT`, `SCRIPT LOAD`, `EVALSHA`) | "
        f"{speed.first_batch_round_trips} |",
        "",
        f"**Round trips per batch = {later:.2f}** (goal ≤ {GOAL_ROUND_TRIPS:.0f}: {verdict}).",
        "",
        f"### Memory for {sims:,} SIMs (one simulated hour)",
        "",
        f"`used_memory` grew by {memory / 2**20:,.1f} MiB: **{memory / sims:,.0f} bytes per SIM**.",
        "",
        "| Key family | MiB | bytes per SIM |",
        "|---|---:|---:|",
    ]
    for family, size in sorted(families.items()):
        lines.append(f"| {family} | {size / 2**20:,.1f} | {size / sims:,.0f} |")
    settings = MeteringSettings()
    hour_days, session_days = settings.hour_retention_days, settings.session_retention_days
    months = math.ceil(settings.day_retention_days / 31) + 1
    lines += [
        "",
        f"### Steady state per SIM (measured over {days} simulated days)",
        "",
        "What each SIM holds at the default retention: hourly buckets and session records "
        f"measured per SIM and UTC day of activity, times {hour_days} and {session_days} "
        "days; daily buckets are one hash per SIM and month, measured full (31 days), times "
        f"{months} months. Fleet, account and network buckets are shared by many SIMs and "
        "left out.",
        "",
        "| Key family | measured | retained | bytes per SIM |",
        "|---|---:|---:|---:|",
    ]
    daily, month = steady.per_sim_day, steady.full_month
    hourly, sessions = daily.get("hourly buckets", 0.0), daily.get("session records", 0.0)
    rows = [
        ("hourly buckets", f"{hourly:,.0f} per day", f"{hour_days} days", hourly * hour_days),
        ("daily buckets", f"{month:,} per month", f"{months} months", month * float(months)),
        (
            "session records",
            f"{sessions:,.0f} per day",
            f"{session_days} days",
            sessions * session_days,
        ),
    ]
    for family, measured, held, size in rows:
        lines.append(f"| {family} | {measured} | {held} | {size:,.0f} |")
    buckets = rows[0][3] + rows[1][3]
    projected = buckets + rows[2][3]
    kib = projected / 1024
    verdict = "met" if kib <= GOAL_KIB_PER_SIM else "not met"
    fitting = math.floor((GOAL_KIB_PER_SIM * 1024 - buckets) / sessions) if sessions else 0
    encoded = ", ".join(f"{n:,} {name}" for name, n in sorted(steady.encodings.items()))
    lines += [
        "",
        f"**{kib:,.1f} KiB per SIM at the default retention** (goal ≤ {GOAL_KIB_PER_SIM} KiB: "
        f"{verdict}), {projected * 100_000 / 2**30:,.1f} GiB for 100,000 SIMs of this mix (on "
        f"average {steady.sessions_per_sim_day:.1f} data sessions per SIM and day). Metering "
        f"hashes by Redis encoding: {encoded} (Redis' default thresholds).",
        "",
        "With a shorter `SUPERSIM_METERING__SESSION_RETENTION_DAYS` (the duplicate detection "
        "and `usage --sessions` reach back that far):",
        "",
        "| session retention | session records | KiB per SIM |",
        "|---:|---:|---:|",
    ]
    for held in sorted({session_days, *SESSION_DAYS}, reverse=True):
        total = buckets + sessions * held
        lines.append(f"| {held} days | {sessions * held:,.0f} | {total / 1024:,.1f} |")
    lines += [
        "",
        f"At most {GOAL_KIB_PER_SIM} KiB per SIM up to a session retention of {fitting} days.",
        "",
        f"### Before and after (previous layout: commit `{BEFORE_COMMIT}`, same streams)",
        "",
        "| Figure | before | after |",
        "|---|---:|---:|",
    ]
    after = {
        "bytes per SIM (100k SIMs, one hour)": memory / sims,
        "hourly buckets per SIM-day": hourly,
        "daily buckets per SIM-month (full)": float(month),
        "session records per SIM-day": sessions,
        "KiB per SIM at the default retention": kib,
    }
    for name, was in BEFORE.items():
        lines.append(f"| {name} | {was:,.0f} | {after[name]:,.0f} |")
    lines += [
        "",
        f"Session records were kept {BEFORE_SESSION_DAYS} days by default before, "
        f"{session_days} days now (Kinesis' 7-day extended retention plus a day; `run` warns "
        "when the stream keeps records longer than the session retention less a day).",
        "",
        REDIS_WORK,
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
