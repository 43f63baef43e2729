"""The episode rules as a pure-Python reference model, and a property test that feeds the
same events to the model and to the real handlers (real redis), delivered by several
simulated replicas at random shard speeds, batch sizes and interleavings, with ticks
between batches: the alerts must be exactly the model's episodes.

The model reads the events in event-time order (a hit before a clear at the same time):

- an episode opens at the hit that makes ``threshold`` hits within ``window`` after the
  last clear and after the previous episode; it starts at the earliest hit that chains to
  that window (hits no more than ``window`` apart);
- it grows with every hit no more than ``window`` after its last one;
- it ends at the first clear after its start (``recovered``), or when quiet for the window
  (``quiet``), and counts every hit from its first to its last.

Delivery stays within what the engine tolerates: each shard delivers its events in order
up to a disorder smaller than ``quiet_grace``; shards run at any relative speed.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from alerts_support import (
    FLEET_A,
    Clock,
    at,
    close_all,
    event,
    finish,
    handler,
    parse,
    reference,
    settings,
    stream_alerts,
)
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.settings import ThresholdOverrides
from worker.handlers.base import Batch

THRESHOLD = 3
WINDOW = 300
GRACE = 60
SIMS = ("HS" + "1" * 32, "HS" + "2" * 32)


@st.composite
def scenario(draw: st.DrawFn) -> dict[str, Any]:
    """Events of two SIMs, spread over shards, each shard's delivery order, and a schedule."""
    events: list[tuple[str, int, int, bool]] = []  # sim, seq, time, hit
    seq = 0
    for sim in SIMS:
        t = 0
        for _ in range(draw(st.integers(0, 40))):
            t += draw(st.sampled_from([1, 5, 10, 30, 60, 120, 290, 310, 600]))
            seq += 1
            events.append((sim, seq, t, draw(st.integers(0, 99)) >= 12))
    shards = draw(st.integers(1, 3))
    placed = [(item, draw(st.integers(0, shards - 1))) for item in events]
    duplicates = draw(st.lists(st.sampled_from(placed), max_size=8)) if placed else []
    orders: list[list[tuple[str, int, int, bool]]] = []
    for shard in range(shards):
        mine = [item for item, where in placed + duplicates if where == shard]
        jitter = [draw(st.integers(0, GRACE - 1)) for _ in mine]
        orders.append(
            [item for _, item in sorted(zip(jitter, mine, strict=True), key=_delivery_order)]
        )
    schedule = draw(st.lists(st.tuples(st.integers(0, shards - 1), st.integers(1, 8)), max_size=60))
    ticks = draw(st.lists(st.booleans(), min_size=len(schedule), max_size=len(schedule)))
    return {"events": events, "orders": orders, "schedule": schedule, "ticks": ticks}


def _delivery_order(pair: tuple[int, tuple[str, int, int, bool]]) -> int:
    jitter, (_, _, ts, _) = pair
    return ts + jitter


@functools.cache
def as_event(item: tuple[str, int, int, bool]) -> ConnectionEvent:
    sim, seq, ts, hit = item
    if hit:
        return event("attachment.rejected", seq, ts, sim=sim, error__code=83705)
    return event("attachment.accepted", 50_000 + seq, ts, sim=sim)


async def deliver(redis: Redis, case: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the case through one rejections handler per shard (the replicas), sharing redis."""
    clock = Clock(at(100_000))
    tuned = settings(fleets={FLEET_A: ThresholdOverrides(storm_rejections=THRESHOLD)})
    orders: list[list[tuple[str, int, int, bool]]] = case["orders"]
    replicas = [handler("rejections", redis, clock, tuned) for _ in orders]
    positions = [0] * len(orders)

    async def batch(shard: int, size: int) -> None:
        part = orders[shard][positions[shard] : positions[shard] + size]
        positions[shard] += len(part)
        if part:
            await replicas[shard].handle(Batch(f"shard-{shard}", [as_event(i) for i in part]))
        clock.advance(1)

    for shard in range(len(orders)):  # every shard reports within the warm-up
        await batch(shard, 1)
    for (shard, size), tick in zip(case["schedule"], case["ticks"], strict=True):
        await batch(shard, size)
        if tick:
            # Every shard is caught up to the earliest event any shard still holds.
            waiting = [o[p][2] for o, p in zip(orders, positions, strict=True) if p < len(o)]
            if waiting:
                await replicas[0].tick(at(min(waiting)))
    for shard, order in enumerate(orders):
        await batch(shard, len(order))
    last = max((item[2] for item in case["events"]), default=0)
    # Ticks until nothing is left to deliver, real time moving on by a claim's lease
    # between rounds (a resolution waits for its opening's delivery).
    lease = replicas[0].settings.webhook.round_seconds * 2 + 11
    for _ in range(10):
        await finish(replicas, at(last + WINDOW + GRACE + 3600))
        if all([await replica.outbox.pending() == 0 for replica in replicas]):
            break
        clock.advance(lease)
    alerts = await stream_alerts(redis)
    await close_all(replicas)
    return alerts


@hypothesis_settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=scenario())
def test_handlers_agree_with_the_reference_model(redis_url: str, case: dict[str, Any]) -> None:
    """Replicas at any relative speed alert exactly the model's storms: each opened and resolved once, same range and count."""

    async def run() -> list[dict[str, Any]]:
        client = Redis.from_url(redis_url)
        await client.flushall()
        try:
            return await deliver(client, case)
        finally:
            await client.aclose()

    alerts = asyncio.run(run())
    unique = {(sim, seq): (ts, hit) for sim, seq, ts, hit in case["events"]}
    for sim in SIMS:
        items = [value for (owner, _), value in unique.items() if owner == sim]
        expected = [
            (e.first, e.last, e.count, e.opened) for e in reference(items, THRESHOLD, WINDOW)
        ]
        mine = [a for a in alerts if a["kind"] == "rejection_storm" and a["sim_sid"] == sim]
        resolved = [a for a in mine if a["status"] == "resolved"]
        opened = [a for a in mine if a["status"] == "open"]
        assert sorted(a["id"] for a in opened) == sorted(a["id"] for a in resolved)
        found = sorted(
            (_secs(a["first_seen"]), _secs(a["last_seen"]), a["count"], _secs(a["opened_at"]))
            for a in resolved
        )
        assert found == sorted(expected), sim


def _secs(text: str) -> int:
    return round((parse(text) - at(0)).total_seconds())
