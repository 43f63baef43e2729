"""Run a handler the way the consumer does, against a real Redis, without Kinesis.

::

    async with HandlerRunner(plugin, redis_url, settings=MySettings()) as run:
        await run.feed([make_connection_event("attachment.rejected", fleet="HF1")])
        await run.feed_stream(fleet.records, shards=4)   # shards concurrently, like replicas
        assert await run.state() == ...

Entering builds the handler from its ``Plugin`` (or its registered name) with its settings
(given, or read from ``SUPERSIM_<SECTION>__*`` like the worker does), an asyncio Redis
client and a key prefix, then calls its ``start`` hook. Feeding a shard for the first time
calls ``on_shards_assigned``; leaving calls ``on_shards_revoked`` for the shards fed, then
``close()``. ``tick()``, ``flush()`` and ``gauges()`` call those hooks when the handler has
them.

Fed items may be decoded ``ConnectionEvent``s, record bytes or event dicts; sink test
events and other CloudEvents are skipped, as the consumer skips them, and a record that
does not decode raises. Each event gets the metadata of its place in the shard (sequence
numbers in feed order, the SIM as partition key). As in the worker, ``handle()`` runs
concurrently for different shards and never concurrently for one shard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final

from pydantic import BaseModel
from redis.asyncio import Redis

from worker import keys
from worker.events.records import ConnectionEvent, KinesisMeta
from worker.handlers.base import (
    Batch,
    Flushes,
    Gauge,
    Handler,
    HasGauges,
    Plugin,
    ShardListener,
    Starts,
    StreamFacts,
    Ticks,
)
from worker.handlers.registry import Chosen, find, read_section, section_name
from worker.testing.events import Item, connection_event_of
from worker.testing.state import State, snapshot

DEFAULT_SHARD: Final = "shardId-000000000000"
DEFAULT_PREFIX: Final = keys.prefix("supersim-test", "test")
DEFAULT_STREAM: Final = StreamFacts(stream_name="supersim-test", retention_hours=24)


def shard_name(index: int) -> str:
    """Kinesis' name of the shard numbered ``index``."""
    return f"shardId-{index:012d}"


def shard_of(partition_key: str, shards: int) -> int:
    """The shard a partition key lands on in a stream of ``shards`` even shards (Kinesis
    hashes it with MD5 into 128-bit ranges)."""
    return int.from_bytes(hashlib.md5(partition_key.encode()).digest()) * shards >> 128


def resolve(
    plugin: Plugin[Any] | str, *, settings: BaseModel | None = None, name: str | None = None
) -> Chosen:
    """A handler's plugin with its settings: ``settings`` when given, else its section read
    from the environment (``SUPERSIM_<SECTION>__*``; a ConfigError names a wrong variable).

    ``plugin`` is a ``Plugin`` or a name the registry knows (an entry point, a built-in or
    ``package.module:attribute``). A ``Plugin`` whose settings come from the environment
    needs its section: ``Plugin.section``, else ``name``."""
    if isinstance(plugin, str):
        name, plugin = name or plugin, find(plugin)
    name = name or plugin.section
    model = plugin.settings
    if model is None:
        if settings is not None:
            raise TypeError("settings given for a plugin that declares none")
    elif settings is not None:
        if not isinstance(settings, model):
            raise TypeError(f"settings must be a {model.__name__}, not {type(settings).__name__}")
    elif name is None:
        raise TypeError(f"give settings=({model.__name__}(...)) or name= to read them from env")
    else:
        settings = read_section(section_name(name, plugin), model)
    return Chosen(name or "handler", plugin, settings)


class HandlerRunner:
    """One handler built as the worker builds it, fed batches as the consumer feeds them."""

    def __init__(
        self,
        plugin: Plugin[Any] | str,
        redis_url: str,
        *,
        settings: BaseModel | None = None,
        name: str | None = None,
        key_prefix: str = DEFAULT_PREFIX,
        stream: StreamFacts = DEFAULT_STREAM,
    ) -> None:
        self.chosen = resolve(plugin, settings=settings, name=name)
        self.key_prefix = key_prefix
        self._url = redis_url
        self._stream = stream
        self._redis: Redis | None = None
        self._handler: Handler | None = None
        self._sequence: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._assigned: list[str] = []

    @property
    def settings(self) -> Any:
        """The handler's validated settings (None for a handler without settings)."""
        return self.chosen.settings

    @property
    def redis(self) -> Redis:
        """The handler's Redis client (while the runner is entered)."""
        if self._redis is None:
            raise RuntimeError("HandlerRunner is not entered: use `async with`")
        return self._redis

    @property
    def handler(self) -> Handler:
        if self._handler is None:
            raise RuntimeError("HandlerRunner is not entered: use `async with`")
        return self._handler

    async def __aenter__(self) -> HandlerRunner:
        self._redis = Redis.from_url(self._url)
        try:
            self._handler = self.chosen.create(self._redis, self.key_prefix)
            if isinstance(self._handler, Starts):
                await self._handler.start(self._stream)
        except BaseException:
            await self._redis.aclose()
            self._redis = self._handler = None
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._assigned:
                await self.revoke(list(self._assigned))
        finally:
            try:
                await self.handler.close()
            finally:
                await self.redis.aclose()
                self._redis = self._handler = None

    # --- feeding -------------------------------------------------------------------------

    def batch(self, items: Iterable[Item], shard_id: str = DEFAULT_SHARD) -> Batch:
        """The connection events among ``items`` as the next batch of ``shard_id``."""
        events = []
        for item in items:
            event = connection_event_of(item)
            if event is None:
                continue
            number = self._sequence.get(shard_id, 0) + 1
            self._sequence[shard_id] = number
            meta = KinesisMeta(shard_id, f"{number:056d}", event.data.sim_sid, event.data.timestamp)
            events.append(dataclasses.replace(event, meta=meta))
        return Batch(shard_id, events)

    async def feed(self, items: Iterable[Item] | Batch, *, shard_id: str = DEFAULT_SHARD) -> Batch:
        """Handle ``items`` as one batch of ``shard_id`` (a ``Batch`` is handled as it is)."""
        batch = items if isinstance(items, Batch) else self.batch(items, shard_id)
        await self.handle(batch)
        return batch

    async def handle(self, batch: Batch) -> None:
        """Hand one batch to the handler: after ``on_shards_assigned`` for a new shard, and
        never while another batch of the same shard is being handled."""
        lock = self._locks.setdefault(batch.shard_id, asyncio.Lock())
        async with lock:
            if batch.shard_id not in self._assigned:
                self._assigned.append(batch.shard_id)
                if isinstance(self.handler, ShardListener):
                    await self.handler.on_shards_assigned([batch.shard_id])
            await self.handler.handle(batch)

    async def feed_stream(
        self, items: Iterable[Item], *, shards: int = 4, batch_size: int = 100
    ) -> list[Batch]:
        """Put ``items`` on a stream of ``shards`` shards (by SIM, as replay does) and
        handle each shard's batches in order, the shards concurrently."""
        by_shard: dict[str, list[ConnectionEvent]] = {}
        for item in items:
            event = connection_event_of(item)
            if event is not None:
                shard = shard_name(shard_of(event.data.sim_sid, shards))
                by_shard.setdefault(shard, []).append(event)
        batches = {
            shard: [
                self.batch(events[i : i + batch_size], shard)
                for i in range(0, len(events), batch_size)
            ]
            for shard, events in sorted(by_shard.items())
        }
        async with asyncio.TaskGroup() as group:
            for shard, parts in batches.items():
                group.create_task(self._handle_all(parts), name=f"feed-{shard}")
        return [batch for parts in batches.values() for batch in parts]

    async def _handle_all(self, batches: Sequence[Batch]) -> None:
        for batch in batches:
            await self.handle(batch)

    # --- the other hooks -----------------------------------------------------------------

    async def tick(self) -> bool:
        """Call the handler's ``tick`` (the consumer does while caught up, and once more as a
        run that ended caught up exits); False if it has none."""
        if not isinstance(self.handler, Ticks):
            return False
        await self.handler.tick()
        return True

    async def flush(self) -> str | None:
        """Call the handler's ``flush`` (the consumer does once as a run that ended caught
        up exits, after the last tick) and return what it says it left undone: None when
        all is done, or when the handler has no ``flush``."""
        if not isinstance(self.handler, Flushes):
            return None
        return await self.handler.flush()

    async def gauges(self) -> list[Gauge]:
        """The handler's gauges ([] if it has none)."""
        if not isinstance(self.handler, HasGauges):
            return []
        return list(await self.handler.gauges())

    async def revoke(self, shards: Sequence[str], *, ended: bool = False) -> None:
        """Take shards away (``ended``: read to their end): ``on_shards_revoked``, after
        their batches returned. A shard fed again later is assigned again."""
        for shard in shards:
            lock = self._locks.get(shard)
            if lock is not None:
                async with lock:  # its batch in flight, if any, returns first
                    pass
            if shard in self._assigned:
                self._assigned.remove(shard)
        if isinstance(self.handler, ShardListener):
            await self.handler.on_shards_revoked(list(shards), ended=ended)

    async def state(self) -> State:
        """The keys under the runner's prefix, read by type (``worker.testing.state``)."""
        return await snapshot(self.redis, self.key_prefix)
