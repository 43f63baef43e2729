"""Metering's script against another version of it: the same Redis state, and Redis CPU.

    python tests/bench/metering_pair.py --old FILE [--sims 560] [--hours 24] [--batch 2500]
        [--rounds 6] [--scenarios 24]

``--old`` is another version's ``metering.lua`` (``git show REV:worker/handlers/metering/
metering.lua > FILE``); the other is this checkout's. Both run through this checkout's
handler, so this compares scripts whose arguments did not change.

1. **Same state:** ``--scenarios`` seeded simulated streams (duplicates, both vendors'
   envelopes, data as a string, schema v1 and v2, a replayed third, shuffles, batches of 1
   to 2,500) are metered by each script on a redis-server of its own. Every key must then
   be the same: its ``DUMP``, or for a hash Redis keeps as a hash table, whose ``DUMP``
   order is the server's own, its fields and values; and both the TTL.
2. **Redis CPU:** one simulated stream (``--sims``, ``--hours``, seed 7) metered in batches
   of ``--batch`` events by each script in turn on one redis-server, ``--rounds`` times
   (the order alternating, each run under a key prefix of its own), taking redis-server's
   CPU per event from ``/proc``. Prints each round and the median ratio new/old.

A development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import redis  # noqa: E402
import redis.asyncio  # noqa: E402
import structlog  # noqa: E402
from servers import RedisServer, start_redis  # noqa: E402

from worker.devtools.simulator import SimulationOptions, generate  # noqa: E402
from worker.events.decode import decode  # noqa: E402
from worker.events.records import ConnectionEvent  # noqa: E402
from worker.handlers.base import Batch  # noqa: E402
from worker.handlers.metering import handler as metering  # noqa: E402
from worker.handlers.metering.settings import MeteringSettings  # noqa: E402

SHARD = "shardId-000000000000"


def connection_events(options: SimulationOptions) -> list[ConnectionEvent]:
    records, _ = generate(options)
    return [event for event in map(decode, records) if isinstance(event, ConnectionEvent)]


def scenarios(count: int) -> Iterator[tuple[int, list[ConnectionEvent], int]]:
    for seed in range(count):
        rng = random.Random(seed)
        events = connection_events(
            SimulationOptions(
                sims=rng.choice([5, 20, 60, 200]),
                hours=rng.choice([2, 6, 30]),
                seed=seed,
                duplicate_share=rng.choice([0.0, 0.1, 0.3]),
                shuffle_window=rng.choice([0, 20, 500]),
                kore_share=rng.choice([0.0, 0.5]),
                data_as_string_share=rng.choice([0.0, 0.2]),
                schema_version=rng.choice([1, 2]),
                roaming_share=rng.choice([0.2, 0.8]),
            )
        )
        if rng.random() < 0.5:
            replayed = events[: len(events) // 3]
            rng.shuffle(replayed)
            events += replayed
        if rng.random() < 0.3:
            rng.shuffle(events)
        yield seed, events, rng.choice([1, 7, 100, 1000, 2500])


def handler(connection: redis.asyncio.Redis, prefix: str, script: str) -> Any:
    meter = metering.MeteringHandler(connection, prefix, MeteringSettings())
    meter._script = connection.register_script(script)
    return meter


async def meter_scenarios(url: str, script: str, count: int) -> list[tuple[int, int]]:
    """Meter every scenario under a prefix of its own; each one's counted and unchanged."""
    connection = redis.asyncio.Redis.from_url(url)
    results = []
    try:
        for seed, events, size in scenarios(count):
            meter = handler(connection, f"{{s{seed}}}", script)
            for at in range(0, len(events), size):
                await meter.handle(Batch(SHARD, events[at : at + size]))
            results.append((meter.windows_counted, meter.unchanged))
    finally:
        await connection.aclose()
    return results


def compare(old: redis.Redis, new: redis.Redis) -> tuple[int, int, list[str]]:
    """(keys, hash tables compared by content, differences)."""
    keys = sorted(old.keys("*"))
    only = set(keys) ^ set(new.keys("*"))
    differences = [f"keys only one side has: {len(only)}"] if only else []
    by_content = 0
    for key in keys:
        if old.dump(key) != new.dump(key):
            encodings = {old.object("encoding", key), new.object("encoding", key)}
            if encodings == {b"hashtable"} and old.hgetall(key) == new.hgetall(key):
                by_content += 1
            else:
                differences.append(f"{key!r}: {encodings}")
        if (old.ttl(key) < 0) != (new.ttl(key) < 0):
            differences.append(f"{key!r}: TTL {old.ttl(key)} against {new.ttl(key)}")
    return len(keys), by_content, differences


def server_cpu(server: RedisServer) -> float:
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_rounds(
    server: RedisServer, scripts: dict[str, str], events: Sequence[ConnectionEvent], args: Any
) -> dict[str, list[float]]:
    connection = redis.asyncio.Redis.from_url(server.url)
    per_event: dict[str, list[float]] = {name: [] for name in scripts}
    try:
        for round_ in range(args.rounds):
            order = list(scripts.items())
            if round_ % 2:
                order.reverse()
            for name, script in order:
                meter = handler(connection, f"{{{name}{round_}}}", script)
                await meter.handle(Batch(SHARD, list(events[:10])))  # script loaded
                before = server_cpu(server)
                for at in range(10, len(events), args.batch):
                    await meter.handle(Batch(SHARD, list(events[at : at + args.batch])))
                per_event[name].append((server_cpu(server) - before) / len(events) * 1e6)
            await connection.flushall()
            old, new = per_event["old"][-1], per_event["new"][-1]
            ratio = f"{new / old:.3f}" if old else "no CPU measured: a longer stream"
            print(f"round {round_}: old {old:.2f}, new {new:.2f} µs per event ({ratio})")
    finally:
        await connection.aclose()
    return per_event


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the other metering.lua")
    parser.add_argument("--sims", type=int, default=560)
    parser.add_argument("--hours", type=float, default=24)
    parser.add_argument("--batch", type=int, default=2500)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--scenarios", type=int, default=24)
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    scripts = {
        "old": metering.fill_layout(args.old.read_text("utf-8")),
        "new": metering.load_script(),
    }
    servers = {name: start_redis() for name in scripts}
    try:
        if args.scenarios:
            results = {
                name: asyncio.run(meter_scenarios(servers[name].url, script, args.scenarios))
                for name, script in scripts.items()
            }
            old, new = (redis.Redis.from_url(servers[name].url) for name in ("old", "new"))
            keys, by_content, differences = compare(old, new)
            if results["old"] != results["new"]:
                differences.append("the scripts counted different windows")
            print(
                f"{args.scenarios} scenarios, {keys:,} keys: {len(differences)} differences "
                f"({by_content} hash tables compared by their fields)"
            )
            for line in differences[:20]:
                print(f"  {line}")
            if differences:
                return 1
        events = connection_events(SimulationOptions(sims=args.sims, hours=args.hours, seed=7))
        print(f"{len(events):,} events, batches of {args.batch:,}")
        per_event = asyncio.run(cpu_rounds(servers["old"], scripts, events, args))
        ratios = [n / o for n, o in zip(per_event["new"], per_event["old"], strict=True) if o]
        print(
            f"median: old {statistics.median(per_event['old']):.2f}, new "
            f"{statistics.median(per_event['new']):.2f} µs per event; median ratio "
            f"{statistics.median(ratios) if ratios else float('nan'):.3f}"
        )
    finally:
        for server in servers.values():
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
