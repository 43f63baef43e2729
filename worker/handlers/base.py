"""The handler contract: what the consumer hands decoded events to.

A handler is any object with a ``name`` and two async methods:

- ``handle(batch)`` takes one batch of decoded connection events of one shard, in
  sequence order, each with its Kinesis metadata (``event.meta``). It returns when the
  batch's effects are durable. Raising makes the consumer retry the batch; it never
  checkpoints past a batch whose handlers have not all returned.
- ``close()`` releases what the handler holds; called once at shutdown.

Handlers must be **idempotent**: delivery is at least once, so the same event can arrive
again (retries, crashes, replays, both vendors during a migration) and out of order.
Handlers never see Kinesis, leases or checkpoints (data flows one way).

Sink test events and non-connection CloudEvents are not passed to handlers; decode
failures go to the dead-letter store instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from worker.events.records import ConnectionEvent

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.settings import Settings


@dataclass(frozen=True, slots=True)
class Batch:
    """One shard's decoded connection events, in sequence-number order.

    ``shard_id`` is empty for dead letters being redriven: they are late events, not part of
    any shard's progress (each event's ``meta`` still names the shard it came from)."""

    shard_id: str
    events: Sequence[ConnectionEvent]

    def __len__(self) -> int:
        return len(self.events)

    def split(self) -> tuple[Batch, Batch]:
        middle = len(self.events) // 2
        return (
            Batch(self.shard_id, self.events[:middle]),
            Batch(self.shard_id, self.events[middle:]),
        )


@runtime_checkable
class Handler(Protocol):
    """Receives batches of decoded connection events. Must be idempotent."""

    name: str

    async def handle(self, batch: Batch) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """What a handler factory gets to build its handler from."""

    settings: Settings
    redis: Redis
    key_prefix: str
    """Redis key prefix of this stream and consumer group, with its Cluster hash tag."""


HandlerFactory = Callable[[HandlerContext], Handler]
