"""``assert_idempotent``: the same events handled once, or twice in another order with
duplicates in the other envelope, must leave the same state in Redis.

Delivery is at least once and unordered (retries, replays, a shard moving to another
replica, both vendors during a migration), so a handler's effect must be a function of the
*set* of distinct events it has seen. This checks that directly::

    await assert_idempotent(plugin, redis_url, events, settings=MySettings())

1. Delete the keys under the prefix; build the handler; feed the events once (as one batch,
   or batches of ``batch_size``); close it; snapshot the keys under its prefix.
2. Delete them again; build a new handler; feed the events, then feed them again shuffled
   (``seed``) together with a copy of each in the other vendor's envelope (``twins``);
   close it; snapshot.
3. The snapshots must be equal (type, value and whether each key expires; TTLs themselves
   move with the clock). Otherwise an ``AssertionError`` lists what differs, key by key.

A handler that writes nothing under its prefix fails too (unless ``allow_empty``): the
check would prove nothing. State that depends on the wall clock (not on the events) makes
the snapshots differ: give such a handler a clock it can be pinned with, or leave those
keys out with ``ignore``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.base import Batch, Plugin
from worker.testing.events import Item, connection_event_of, twin
from worker.testing.runner import DEFAULT_PREFIX, DEFAULT_SHARD, HandlerRunner
from worker.testing.state import State, delete, diff, snapshot


async def assert_idempotent(
    plugin: Plugin[Any] | str,
    redis_url: str,
    events: Iterable[Item] | Batch,
    *,
    settings: BaseModel | None = None,
    name: str | None = None,
    key_prefix: str = DEFAULT_PREFIX,
    seed: int = 0,
    twins: bool = True,
    batch_size: int | None = None,
    allow_empty: bool = False,
    ignore: Iterable[str] = (),
) -> State:
    """Raise AssertionError unless handling ``events`` once and twice (the second time
    shuffled, with twins) leave equal state under ``key_prefix`` (module docstring).
    ``ignore``: glob patterns of keys (without the prefix) left out of the comparison,
    e.g. bookkeeping written from the wall clock. Returns the state after one feed. The
    keys under ``key_prefix`` are deleted first."""
    items = events.events if isinstance(events, Batch) else events
    once_events = [event for event in map(connection_event_of, items) if event is not None]
    if not once_events:
        raise ValueError("assert_idempotent needs at least one connection event")
    again = once_events + ([twin(event) for event in once_events] if twins else [])
    random.Random(seed).shuffle(again)
    skipped = tuple(ignore)

    async def run(*feeds: list[ConnectionEvent]) -> State:
        await delete(redis, key_prefix)
        async with HandlerRunner(
            plugin, redis_url, settings=settings, name=name, key_prefix=key_prefix
        ) as runner:
            for feed in feeds:
                size = batch_size or len(feed)
                for start in range(0, len(feed), size):
                    await runner.feed(feed[start : start + size], shard_id=DEFAULT_SHARD)
        state = await snapshot(redis, key_prefix)
        return {k: v for k, v in state.items() if not any(fnmatchcase(k, p) for p in skipped)}

    redis = Redis.from_url(redis_url)
    try:
        once = await run(once_events)
        if not once and not allow_empty:
            raise AssertionError(
                f"the handler wrote nothing under {key_prefix!r} from {len(once_events)} "
                "events, so idempotency is not shown (are its keys under context.key_prefix? "
                "pass allow_empty=True if writing nothing is right)"
            )
        twice = await run(once_events, again)
    finally:
        await redis.aclose()
    if once != twice:
        second = f"shuffled with seed={seed}" + (
            ", each with its twin in the other envelope" if twins else ""
        )
        raise AssertionError(
            f"not idempotent: the Redis state under {key_prefix!r} differs between handling "
            f"{len(once_events)} events once and handling them twice (the second time "
            f"{second}):\n" + diff(once, twice, "once", "twice")
        )
    return once
