"""Several workers on one stream, sharing redis: every episode still alerts exactly once."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from alerts_support import (
    NOISY,
    Clock,
    Receiver,
    close_all,
    feed,
    finish,
    fleet_subject,
    handler,
    match,
    settings,
    sim_end,
    sim_subject,
    simulated,
    stream_alerts,
    webhook_settings,
)
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.settings import AlertSettings

NAMES = ("rejections", "data_limit", "attach_loops")


async def worker(
    redis_url: str,
    clock: Clock,
    alert_settings: AlertSettings,
    events: Sequence[ConnectionEvent],
    batch_size: int,
    shard: str,
) -> tuple[Redis, list[AlertHandler]]:
    """One replica: its own redis connection and all three alert handlers."""
    client = Redis.from_url(redis_url)
    handlers = [handler(name, client, clock, alert_settings) for name in NAMES]
    for start in range(0, len(events), batch_size):
        await feed(handlers, events[start : start + batch_size], batch_size, shard)
        clock.advance(1)  # wall time passes while workers run (shard warm-up, leases)
    return client, handlers


async def finish_all(handlers: Sequence[AlertHandler], clock: Clock, until: datetime) -> None:
    """Every replica ticks until nothing is left to deliver. Between rounds the clock moves
    on by a claim's lease, as real time would: an entry one replica claimed but did not
    send (its claim ran out in a queue, or its resolution waited for the opening) is
    claimed again, by whichever replica ticks first."""
    lease = handlers[0].settings.webhook.round_seconds + 11
    for _ in range(10):
        await asyncio.gather(*(finish([h], until) for h in handlers))
        if all([await h.outbox.pending() == 0 for h in handlers]):
            return
        clock.advance(lease)


async def stop(replicas: Sequence[tuple[Redis, list[AlertHandler]]]) -> None:
    for client, handlers in replicas:
        await close_all(handlers)
        await client.aclose()


def check_exactly_once(alerts: list[dict[str, Any]], truth: dict[str, Any]) -> None:
    statuses = Counter((a["id"], a["status"]) for a in alerts)
    assert max(statuses.values()) == 1
    checks = [
        ("rejection_storm", truth["rejection_storms"], sim_subject),
        ("fleet_network_rejections", truth["fleet_rejection_episodes"], fleet_subject),
        ("attach_loop", truth["attach_loops"], sim_subject),
        ("data_limit_reached", truth["data_limit_episodes"], sim_subject),
    ]
    for kind, found, subject in checks:
        matched = match(alerts, kind, found, subject)
        assert matched.not_exactly_once == [], kind
        assert matched.extra == [], kind


async def test_two_workers_handling_the_same_stream_produce_single_alerts(
    redis_url: str, receiver: Receiver
) -> None:
    """Two workers handling the same stream concurrently write and post each alert once."""
    events, truth = simulated(**NOISY)
    end = sim_end(NOISY)
    clock = Clock(end)
    tuned = webhook_settings(receiver.url)
    replicas = await asyncio.gather(
        worker(redis_url, clock, tuned, events, 500, "shardId-000000000000"),
        worker(redis_url, clock, tuned, events, 173, "shardId-000000000000"),
    )
    handlers = [h for _, group in replicas for h in group]
    await finish_all(handlers, clock, end + timedelta(hours=1))
    alerts = await stream_alerts(replicas[0][0])
    check_exactly_once(alerts, truth)
    assert receiver.repeats == 0
    assert receiver.accepted == {f"{a['id']}:{a['status']}": a for a in alerts}
    await stop(replicas)


def shard_of(item: ConnectionEvent, shards: int) -> int:
    """Records spread over shards by event, not by SIM (the partition key is unknown)."""
    return hashlib.md5(item.event_sid.encode()).digest()[0] % shards


async def test_three_replicas_splitting_the_shards_find_every_episode_once(
    redis_url: str,
) -> None:
    """Three replicas splitting the shards find each episode once, and resolve none before its end."""
    events, truth = simulated(**NOISY)
    end = sim_end(NOISY)
    clock = Clock(end)
    tuned = settings()
    parts = [[e for e in events if shard_of(e, 3) == n] for n in range(3)]
    replicas = await asyncio.gather(
        *(
            worker(redis_url, clock, tuned, part, 50, f"shardId-00000000000{n}")
            for n, part in enumerate(parts)
        )
    )
    handlers = [h for _, group in replicas for h in group]
    await finish_all(handlers, clock, end + timedelta(hours=1))
    alerts = await stream_alerts(replicas[0][0])
    check_exactly_once(alerts, truth)
    storms = match(alerts, "rejection_storm", truth["rejection_storms"], sim_subject)
    for episode, (alert,) in storms.found:
        assert alert["status"] == "resolved"
        assert alert["count"] == episode["count"]
    await stop(replicas)
