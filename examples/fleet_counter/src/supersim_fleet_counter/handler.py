"""Distinct connection events per fleet, kind and UTC day, in Redis.

Each (fleet, kind, day) is a Redis set of event sids, ``<prefix>:fc:<fleet>:<kind>:<day>``:
adding a sid again changes nothing, so duplicates, replays and any order give the same
counts (idempotent), and a set's size is its count. A set expires ``ttl_days`` after it
last grew. Events without a fleet count under ``none``.
"""

from __future__ import annotations

from collections import defaultdict

from redis.asyncio import Redis

from supersim_fleet_counter.settings import CounterSettings
from worker.handlers.base import Batch, HandlerContext, Plugin


def counts_key(prefix: str, fleet: str, kind: str, day: str) -> str:
    return f"{prefix}:fc:{fleet}:{kind}:{day}"


class FleetCounter:
    name = "fleet_counter"

    def __init__(self, context: HandlerContext[CounterSettings]) -> None:
        self.redis, self.prefix, self.settings = context.redis, context.key_prefix, context.settings

    async def handle(self, batch: Batch) -> None:
        sids: defaultdict[str, set[str]] = defaultdict(set)
        for event in batch.events:
            if event.kind in self.settings.kinds:
                day = event.data.timestamp.strftime("%Y%m%d")
                key = counts_key(self.prefix, event.data.fleet_sid or "none", event.kind, day)
                sids[key].add(event.event_sid)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, members in sids.items():
                pipe.sadd(key, *members)
                pipe.expire(key, self.settings.ttl_days * 86_400)
            await pipe.execute()

    async def close(self) -> None:
        """Nothing to release: the Redis client belongs to the worker."""


async def count(redis: Redis, prefix: str, fleet: str, kind: str, day: str = "*") -> int:
    """Distinct events of ``kind`` in ``fleet`` on ``day`` (``YYYYMMDD``; all days by default)."""
    keys = [key async for key in redis.scan_iter(match=counts_key(prefix, fleet, kind, day))]
    return sum([await redis.scard(key) for key in keys])  # type: ignore[misc]


plugin = Plugin(FleetCounter, settings=CounterSettings)
"""What the ``supersim_worker.handlers`` entry point names."""
