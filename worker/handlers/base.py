"""The handler API: what the consumer hands decoded events to, and how a handler plugs in.

A handler is any object with a ``name`` and two async methods (``Handler``):

- ``handle(batch)`` takes one batch of decoded connection events of one shard, in
  sequence order, each with its Kinesis metadata (``event.meta``). It returns when the
  batch's effects are durable. Raising makes the consumer retry the batch; it never
  checkpoints past a batch whose handlers have not all returned.
- ``close()`` releases what the handler holds; called once at shutdown.

**Concurrency.** ``handle()`` is called concurrently for different shards (one task per
owned shard), and never concurrently for one shard: a shard's next batch waits for the
previous one to return. The optional hooks below run in the same event loop, possibly
while ``handle()`` of some shard is awaiting.

**Idempotency.** Delivery is at least once, so the same event can arrive again (retries,
crashes, replays, both vendors during a migration) and out of order; the same batch may be
handled twice, and a shard may move to another replica between two batches. Handlers
never see Kinesis, leases or checkpoints (data flows one way: shards → decode → handlers
→ checkpoint). Sink test events and non-connection CloudEvents are not passed to
handlers; decode failures go to the dead-letter store instead.

**Plugging in.** A ``Plugin`` says how to build a handler (``factory``) and which settings
it reads (``settings``, a pydantic model, from ``SUPERSIM_<SECTION>__*``; the section is
the handler's name unless it says otherwise). The settings are validated at start-up,
with errors naming the variable, and handed over as ``HandlerContext.settings``. A package
registers it under the ``supersim_worker.handlers`` entry-point group (see
``worker.handlers.registry``); a bare factory is accepted too (a handler without settings).

**Optional hooks**, each a Protocol a handler may implement (``Starts``, ``Ticks``,
``Flushes``, ``HasGauges``, ``ShardListener``); the consumer checks them with ``isinstance``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from worker.events.records import ConnectionEvent, EventKind

if TYPE_CHECKING:
    from redis.asyncio import Redis


@dataclass(frozen=True, slots=True)
class Batch:
    """One shard's decoded connection events, in sequence-number order.

    ``shard_id`` is empty for dead letters being redriven: they are late events, not part of
    any shard's progress (each event's ``meta`` still names the shard it came from).

    ``kinds`` (each event's kind, in the same order) and ``latest`` (the latest event time,
    None for no events) are facts about ``events`` worked out once: the consumer notes them
    while it decodes the batch, so that a handler interested in a few kinds, or in the
    batch's latest time, need not walk every decoded event for them (with thousands of events
    a batch, each walk reads memory the CPU's caches no longer hold). ``Batch(shard_id,
    events)`` works them out itself. ``events`` must not be changed once the batch is made:
    ``kinds`` and ``latest`` describe them as they were."""

    shard_id: str
    events: Sequence[ConnectionEvent]
    kinds: Sequence[EventKind] = field(init=False, repr=False, compare=False)
    latest: datetime | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        events = self.events
        object.__setattr__(self, "kinds", [event.kind for event in events])
        latest = max((event.envelope.data.timestamp for event in events), default=None)
        object.__setattr__(self, "latest", latest)

    @classmethod
    def decoded(
        cls,
        shard_id: str,
        events: Sequence[ConnectionEvent],
        kinds: Sequence[EventKind],
        latest: datetime | None,
    ) -> Batch:
        """A batch whose maker noted ``kinds`` and ``latest`` as it built ``events`` (they
        must be what ``Batch(shard_id, events)`` would work out)."""
        if len(kinds) != len(events):
            raise ValueError(f"{len(kinds)} kinds for {len(events)} events")
        batch = object.__new__(cls)
        for name, value in (
            ("shard_id", shard_id),
            ("events", events),
            ("kinds", kinds),
            ("latest", latest),
        ):
            object.__setattr__(batch, name, value)
        return batch

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


# --- optional hooks --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamFacts:
    """What the consumer knows about the stream when it starts."""

    stream_name: str
    retention_hours: int | None
    """How long the stream keeps records (None when it could not be read)."""


@runtime_checkable
class Starts(Protocol):
    """Called once before the first batch, with facts about the stream (e.g. to warn
    that a setting does not fit the stream's retention). Raising stops the start-up."""

    async def start(self, stream: StreamFacts) -> None: ...


@runtime_checkable
class Ticks(Protocol):
    """Called every idle interval while the consumer is caught up on every shard of the
    stream (its own and other replicas'): event time may move to the wall clock. Called
    once more as a run that ended caught up (``run --until-caught-up``) exits, after its
    readers stopped."""

    async def tick(self) -> None: ...


@runtime_checkable
class Flushes(Protocol):
    """Called once as a run that ended caught up exits, after the last ``tick`` and before
    ``close``: finish the work queued so far (e.g. deliveries), within the handler timeout.
    Returns None once it is all done, else what is left, in words (it stays queued for a
    later run): the run then exits saying so (``last_tick_incomplete``, status 3)."""

    async def flush(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Gauge:
    """One reading for the metrics, exported as ``supersim_<name>``: ``name`` (e.g.
    ``open_alerts``) with bounded labels (a kind, a fleet; never a SIM). ``counter`` marks
    a running total (exported as ``supersim_<name>_total``)."""

    name: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)
    counter: bool = False


@runtime_checkable
class HasGauges(Protocol):
    """Read now and then (every few ticks) into the worker's metrics."""

    async def gauges(self) -> Sequence[Gauge]: ...


@runtime_checkable
class ShardListener(Protocol):
    """Told when this replica starts or stops reading shards, like aiokafka's rebalance
    listener and KCL's ``leaseLost`` / ``shardEnded``. ``on_shards_assigned`` comes before
    the shard's first batch; ``on_shards_revoked`` after its last batch here returned
    (lease released, lost, or the shard ended: ``ended`` is True when it was read to its
    end). State kept per shard must not be trusted after a revoke: another replica may
    read the shard next."""

    async def on_shards_assigned(self, shards: Sequence[str]) -> None: ...

    async def on_shards_revoked(self, shards: Sequence[str], *, ended: bool) -> None: ...


# --- building handlers -----------------------------------------------------------------------

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class HandlerContext(Generic[S]):
    """What a handler factory gets to build its handler from."""

    settings: S
    """The handler's own settings (its plugin's model, read from ``SUPERSIM_<SECTION>__*``),
    or None for a handler without settings."""
    redis: Redis
    key_prefix: str
    """Redis key prefix of this stream and consumer group, with its Cluster hash tag."""


HandlerFactory = Callable[[HandlerContext[Any]], Handler]


@dataclass(frozen=True, slots=True)
class Plugin(Generic[S]):
    """A handler as a package provides it: what an entry point names."""

    factory: Callable[[HandlerContext[S]], Handler]
    settings: type[S] | None = None
    """A pydantic model of the handler's settings, or None."""
    section: str | None = None
    """Environment section of the settings, ``SUPERSIM_<SECTION>__*``: the handler's
    name when None. Handlers sharing a section (the alert rules share ``alerts``) share
    one validated settings object."""
    alerts: bool = False
    """The handler raises alerts through ``worker.handlers.alerts`` (an ``AlertHandler``):
    the ``alerts`` commands include it."""

    def section_for(self, name: str) -> str:
        return self.section or name

    def __post_init__(self) -> None:
        if self.settings is not None and not (
            isinstance(self.settings, type) and issubclass(self.settings, BaseModel)
        ):
            raise TypeError(
                f"Plugin.settings must be a pydantic model class, got {self.settings!r}"
            )
