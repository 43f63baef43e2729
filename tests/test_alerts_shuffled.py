"""Alert episodes under random delivery: shuffled past the grace, duplicated, in small
batches with event time advancing between them (a seeded property test, real redis).

Whatever the order, each alert opens once and resolves at most once, never resolves
before it opened nor reports events after its resolution, counts each of its events
once (per code too), and no two alerts of a subject cover the same events.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from alerts_support import (
    FLEET_A,
    Clock,
    at,
    event,
    feed,
    finish,
    handler,
    parse,
    settings,
    stream_alerts,
)
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.settings import ThresholdOverrides

LATENESS = 300
"""Seconds an event may be delivered behind its event time: five times the grace."""


def timeline(rng: random.Random, kind: str) -> tuple[list[ConnectionEvent], int]:
    """One SIM's hits and clears at random gaps (bursts and quiet spells)."""
    events, t = [], 0
    for seq in range(rng.randint(5, 60)):
        t += rng.choice([1, 5, 10, 20, 40, 60, 200, 400])
        if kind == "rejections":
            if rng.random() < 0.15:
                events.append(event("attachment.accepted", 10_000 + seq, t))
            else:
                events.append(event("attachment.rejected", seq, t, error__code=83705))
        elif kind == "attach_loops":
            if rng.random() < 0.15:
                events.append(event("data-session.started", 10_000 + seq, t))
            else:
                events.append(event("attachment.accepted", seq, t))
        elif rng.random() < 0.3:
            events.append(event("data-session.updated", seq, t))
        else:
            events.append(event("data-session.updated", seq, t, data_modifier="blocked"))
    return events, t


def delivered(rng: random.Random, events: list[ConnectionEvent]) -> list[ConnectionEvent]:
    """Each event delayed by up to LATENESS, then a quarter of them again."""
    order = sorted(events, key=lambda e: e.data.timestamp.timestamp() + rng.uniform(0, LATENESS))
    return order + rng.sample(order, k=len(order) // 4)


@pytest.mark.parametrize("kind", ["rejections", "attach_loops", "data_limit"])
@pytest.mark.parametrize("seed", range(60))
async def test_shuffled_delivery_keeps_alerts_consistent(
    redis: Redis, seed: int, kind: str
) -> None:
    rng = random.Random(seed)
    events, end = timeline(rng, kind)
    stream = delivered(rng, events)
    low = settings(fleets={FLEET_A: ThresholdOverrides(storm_rejections=3, attach_loop_accepts=3)})
    handlers = [handler(kind, redis, Clock(at(end + 7200)), low)]
    seen: datetime | None = None
    pos = 0
    while pos < len(stream):
        size = rng.randint(1, 6)
        batch = stream[pos : pos + size]
        pos += size
        await feed(handlers, batch, batch_size=size)
        newest = max(e.data.timestamp for e in batch)
        seen = newest if seen is None else max(seen, newest)
        if rng.random() < 0.2:
            await finish(handlers, seen)  # event time reaches the newest event seen
    await finish(handlers, at(end + 3600))
    alerts = await stream_alerts(redis)

    assert all(n == 1 for n in Counter((a["id"], a["status"]) for a in alerts).values())
    opened = {a["id"] for a in alerts if a["status"] == "open"}
    final: dict[str, dict[str, Any]] = {a["id"]: a for a in alerts}
    for alert in final.values():
        assert alert["id"] in opened
        assert alert["count"] >= 1
        if alert["kind"] == "rejection_storm":
            assert sum(c["count"] for c in alert["details"]["codes"]) == alert["count"]
        if alert["status"] == "resolved":
            assert parse(alert["resolved_at"]) >= parse(alert["opened_at"])
            assert parse(alert["last_seen"]) <= parse(alert["resolved_at"])
    if kind != "data_limit":  # these end when quiet; a data limit may still be reached
        assert all(a["status"] == "resolved" for a in final.values())
    spans = sorted((parse(a["first_seen"]), parse(a["last_seen"])) for a in final.values())
    for earlier, later in itertools.pairwise(spans):
        assert earlier[1] < later[0]
