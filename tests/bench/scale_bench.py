"""Replicas sharing a stream's shards (issue #12): failover, handoff, rebalance, Redis load.

Real ``supersim-worker run`` processes (the ``recording`` test handler) on a kinesalite
and a redis-server, with the default lease settings (TTL 8 s renewed every 2 s, a
balancing round every second, idle interval 1 s). A trickle puts a record on every open
shard every 0.1 s and notes when each one is handled (``tests/replica_support.py``).

- Failover: 3 replicas on 8 shards; kill -9 one holding 3 leases; the time until a
  record put after the kill has been handled on each of its shards. A new replica then
  replaces it. Repeated ``ROUNDS`` times.
- Handoff: the same with SIGTERM.
- Rebalance: from a replica's removal until the others hold 4/4; from a replica's start
  (and from its first heartbeat) until the leases are 3/3/2 again (2 → 3 replicas: the
  replacements above) or 2/2/2/2 (3 → 4, then SIGTERM back to 3/3/2).
- Redis at rest: 3 replicas on 8 shards and no records, ``INFO commandstats`` deltas
  over ``WINDOW`` seconds, per command and per replica; ``MONITOR`` over the same window
  tells the round trips (commands a client sent) from the commands Lua scripts ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from replica_support import Group, Replica, Trickle
from servers import start_kinesalite, start_redis

KEY = "scale"
TITLE = "Replicas: failover, handoff, rebalance, Redis load at rest"
ROUNDS = 10
WINDOW = 30.0
SETTLE = 90.0
ENV = {"SUPERSIM_IDLE_INTERVAL": "1"}
"""The default idle interval (the test helpers' own default is shorter)."""


@dataclass
class Figures:
    failover: list[float] = field(default_factory=list)
    handoff: list[float] = field(default_factory=list)
    removed_crash: list[float] = field(default_factory=list)
    removed_sigterm: list[float] = field(default_factory=list)
    added_3: list[float] = field(default_factory=list)
    added_3_beat: list[float] = field(default_factory=list)
    added_4: list[float] = field(default_factory=list)
    added_4_beat: list[float] = field(default_factory=list)
    removed_4: list[float] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    in_scripts: Counter[str] = field(default_factory=Counter)
    round_trips: Counter[str] = field(default_factory=Counter)
    window: float = WINDOW
    replicas: int = 3
    redis_version: str = ""
    load: list[str] = field(default_factory=list)
    """The 1-minute load average at each stage (other processes share the machine)."""


async def first_heartbeat(group: Group, replica: Replica, within: float = SETTLE) -> float:
    """Seconds from the replica's start until it is in the group's live set."""
    while not any(replica.owns(rid) for rid in await group.live_ids()):
        if time.monotonic() - replica.started > within:
            raise AssertionError(f"{replica.name} never heartbeat\n{replica.tail()}")
        await asyncio.sleep(0.05)
    return time.monotonic() - replica.started


async def add(group: Group, expected: Sequence[int]) -> tuple[float, float]:
    """Start a replica; seconds until the leases are ``expected``, from its start and from
    its first heartbeat."""
    replica = group.start()
    beat = await first_heartbeat(group, replica)
    await group.wait_balanced(expected, SETTLE, interval=0.05)
    converged = time.monotonic() - replica.started
    return converged, converged - beat


async def series(group: Group, signum: signal.Signals, rounds: int, figures: Figures) -> None:
    """``rounds`` times: stop (``signum``) a replica holding 3 of 8 shards, time its shards'
    takeover and the rebalance, then replace it and time that rebalance."""
    crash = signum is signal.SIGKILL
    await group.create(8)
    for _ in range(3):
        group.start()
    await group.wait_balanced([3, 3, 2], SETTLE)
    async with Trickle(group, period=0.1) as trickle:
        for _ in range(rounds):
            await trickle.wait_resumed(group.open_shards, time.monotonic(), SETTLE)
            counts = await group.counts()
            victim = max(group.live(), key=lambda r: counts[r.name])
            shards = await group.held_by(victim)
            began = time.monotonic()
            victim.signal(signum)
            resumed = await trickle.wait_resumed(shards, began, SETTLE)
            await group.wait_balanced([4, 4], SETTLE, interval=0.05)
            (figures.failover if crash else figures.handoff).append(resumed)
            removed = figures.removed_crash if crash else figures.removed_sigterm
            removed.append(time.monotonic() - began)
            await victim.wait(60)
            converged, from_beat = await add(group, [3, 3, 2])
            figures.added_3.append(converged)
            figures.added_3_beat.append(from_beat)


async def fourth(group: Group, rounds: int, figures: Figures) -> None:
    """``rounds`` times: a 4th replica joins 3 (to 2/2/2/2), then is stopped (to 3/3/2)."""
    for _ in range(rounds):
        converged, from_beat = await add(group, [2, 2, 2, 2])
        figures.added_4.append(converged)
        figures.added_4_beat.append(from_beat)
        newest = group.live()[-1]
        began = time.monotonic()
        newest.signal(signal.SIGTERM)
        await group.wait_balanced([3, 3, 2], SETTLE, interval=0.05)
        figures.removed_4.append(time.monotonic() - began)
        await newest.wait(60)


async def at_rest(group: Group, window: float, figures: Figures) -> None:
    """Redis commands while 3 replicas hold 8 idle shards (no records)."""
    await group.create(8)
    for _ in range(3):
        group.start()
    await group.wait_balanced([3, 3, 2], SETTLE)
    await asyncio.sleep(5)  # steady state: every reader idle, every lease renewed
    admin = Redis.from_url(group.redis_url)
    try:
        figures.redis_version = (await admin.info("server"))["redis_version"]
        before = await admin.info("commandstats")
        async with admin.monitor() as monitor:
            watching = asyncio.create_task(watch(monitor, figures))
            await asyncio.sleep(window)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        after = await admin.info("commandstats")
    finally:
        await admin.aclose()
    ignored = {"info", "monitor", "config", "client"}
    for name, stats in after.items():
        command = name.removeprefix("cmdstat_")
        if command in ignored:
            continue
        calls = stats["calls"] - before.get(name, {}).get("calls", 0)
        if calls:
            figures.calls[command] = calls
    figures.window = window


async def watch(monitor: object, figures: Figures) -> None:
    async for entry in monitor.listen():  # type: ignore[attr-defined]
        command = entry["command"].split(" ", 1)[0].lower()
        if entry["client_type"] == "lua":
            figures.in_scripts[command] += 1
        elif command not in {"info", "monitor"}:
            figures.round_trips[command] += 1


async def measure(kinesalite: str, redis_url: str, logs: Path, quick: bool) -> Figures:
    figures = Figures()
    rounds = 2 if quick else ROUNDS
    crashes = Group(kinesalite, redis_url, logs, env=dict(ENV))
    graceful = Group(kinesalite, redis_url, logs, env=dict(ENV))
    rest = Group(kinesalite, redis_url, logs, env=dict(ENV))
    try:
        figures.load.append(load_average())
        await series(crashes, signal.SIGKILL, rounds, figures)
        await crashes.close()
        figures.load.append(load_average())
        await series(graceful, signal.SIGTERM, rounds, figures)
        await fourth(graceful, 1 if quick else 3, figures)
        await graceful.close()
        figures.load.append(load_average())
        await at_rest(rest, 10.0 if quick else WINDOW, figures)
        figures.load.append(load_average())
    finally:
        for group in (crashes, graceful, rest):
            with contextlib.suppress(Exception):
                await group.close()
    return figures


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def row(what: str, values: list[float]) -> str:
    if not values:
        return f"| {what} | - | - | 0 |"
    return f"| {what} | {statistics.median(values):.2f} s | {max(values):.2f} s | {len(values)} |"


def render(figures: Figures) -> str:
    per = figures.window * figures.replicas
    total = sum(figures.calls.values()) / per
    trips = sum(figures.round_trips.values()) / per
    scripts = figures.round_trips.get("evalsha", 0) / per
    worst_failover = max(figures.failover, default=float("nan"))
    worst_handoff = max(figures.handoff, default=float("nan"))
    lines = [
        "3 replicas (`supersim-worker run`, the `recording` test handler) on an 8-shard "
        "kinesalite stream and one redis-server, default lease settings: TTL 8 s renewed "
        "every 2 s, a balancing round every second, ListShards every 30 s, idle interval "
        "1 s. A record is put on every shard every 0.1 s; a shard counts as read again when "
        "a record put on it after the event has been handled (so the figures include "
        "reader start-up and the first GetRecords). Start-up figures include Python "
        "process start-up. Load average (1 min) at the start of each stage: "
        f"{', '.join(figures.load)} (other work shared the machine).",
        "",
        "| What | median | worst | runs |",
        "|---|---:|---:|---:|",
        row(
            "failover: kill -9 of a replica holding 3 → all its shards read again", figures.failover
        ),
        row("handoff: SIGTERM of a replica holding 3 → all its shards read again", figures.handoff),
        row("rebalance after a replica is removed, kill -9 (3 → 2, to 4/4)", figures.removed_crash),
        row(
            "rebalance after a replica is removed, SIGTERM (3 → 2, to 4/4)", figures.removed_sigterm
        ),
        row("rebalance after a replica is removed, SIGTERM (4 → 3, to 3/3/2)", figures.removed_4),
        row(
            "rebalance after a replica is added (2 → 3, to 3/3/2), from its start", figures.added_3
        ),
        row("  the same, from its first heartbeat", figures.added_3_beat),
        row(
            "rebalance after a replica is added (3 → 4, to 2/2/2/2), from its start",
            figures.added_4,
        ),
        row("  the same, from its first heartbeat", figures.added_4_beat),
        "",
        f"Goals: failover within 10 s (worst {worst_failover:.2f} s: "
        f"{'met' if worst_failover <= 10 else 'not met'}); handoff within 2 s (worst "
        f"{worst_handoff:.2f} s: {'met' if worst_handoff <= 2 else 'not met'}).",
        "",
        f"### Redis at rest: 3 replicas, 8 idle shards, {figures.window:.0f} s "
        f"(redis-server {figures.redis_version})",
        "",
        f"**{total:.1f} commands/s per replica** (`INFO commandstats` deltas, commands run "
        f"by Lua scripts included), in **{trips:.1f} round trips/s per replica**, of which "
        f"{scripts:.1f} script calls (`EVALSHA`; `MONITOR` over the same window).",
        "",
        "| command | calls/s per replica | run inside scripts |",
        "|---|---:|---:|",
    ]
    for command, calls in figures.calls.most_common():
        inside = figures.in_scripts.get(command, 0)
        lines.append(f"| `{command.upper()}` | {calls / per:.2f} | {inside / max(calls, 1):.0%} |")
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    kinesalite = start_kinesalite()
    redis = start_redis()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            figures = asyncio.run(measure(kinesalite.url, redis.url, Path(tmp), quick))
    finally:
        kinesalite.stop()
        redis.stop()
    return render(figures)


if __name__ == "__main__":
    print(run(quick=True))
