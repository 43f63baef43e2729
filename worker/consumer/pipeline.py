"""One shard batch, from raw records to handled: decode → handlers → dead-letter.

Decode failures never reach the handlers; they are written to the dead-letter store with
the handlers' failures once the batch is done, before it is checkpointed, so a batch
retried after a handler outage does not dead-letter them twice. Each handler gets the batch's
connection events; a handler that raises is retried with backoff (``handler_attempts``
tries). If it still fails, the batch is bisected to isolate the failing record(s), which
are dead-lettered with the handler's name and exception, and the rest is handled: a
poison record never stalls the shard and nothing is skipped without a dead-letter entry.

Every handler call is bounded by ``handler_timeout``: a call cut off is a
``HandlerTimeout``, an infrastructure failure like the others, so a record that makes a
handler hang is never dead-lettered: its shard waits and retries, and shows in
``/healthz`` and ``supersim_handler_timeouts_total`` (a handler must not hang). Infrastructure failures
(Redis or network down, timeouts, ``RetriableError``) are not the records' fault: they are retried, then raised as ``HandlerUnavailable`` so the shard
reader stops without checkpointing and is restarted from its last checkpoint. So is a
handler that looks broken rather than fed bad data: one failing on every event of a
sizeable batch, or failing on ``BROKEN_HANDLER_RECORDS`` single records with the same
exception type within ``BROKEN_HANDLER_WINDOW`` seconds (a lost permission, a bug hit by a
whole class of events). Its shards then wait and retry instead of dead-lettering live
traffic record by record, but only for ``outage_patience`` seconds from when the handler
was first taken to be broken on that shard: after that the records it fails on there are
dead-lettered, so a shard never stalls for good. A shard's outage ends when one of its
batches goes through the handler without it looking broken; other shards' batches going
through do not end it (they may be other records than the failing ones).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple

import structlog

from worker.backoff import Backoff
from worker.consumer.deadletter import DECODE, DeadLetter, DeadLetterStore
from worker.errors import DecodeError, RetriableError, is_infrastructure_failure
from worker.events.decode import decode
from worker.events.records import (
    ConnectionEvent,
    EventKind,
    OtherEvent,
    SinkTestEvent,
    new_kinesis_meta,
)
from worker.handlers.base import Batch, Handler
from worker.metrics import Metrics


class RawRecord(NamedTuple):
    """A record as GetRecords returned it. A named tuple: immutable like a frozen
    dataclass, built in a tenth of the time (thousands of them per batch)."""

    data: bytes
    sequence_number: str
    partition_key: str
    arrival: datetime | None = None


def raw_records(records: Iterable[Mapping[str, Any]]) -> list[RawRecord]:
    """Records as GetRecords or a SubscribeToShard event holds them (parsed) as
    ``RawRecord``s."""
    return [
        RawRecord(
            r["Data"],
            r["SequenceNumber"],
            r.get("PartitionKey", ""),
            r.get("ApproximateArrivalTimestamp"),
        )
        for r in records
    ]


DECODE_CHUNK: Final = 500
"""Records decoded between two turns of the event loop (about 10 ms of CPU here)."""

BROKEN_HANDLER_BATCH = 8
"""A handler failing on every event of a batch at least this big is broken, not the data."""
BROKEN_HANDLER_RECORDS = 8
BROKEN_HANDLER_WINDOW = 60.0
"""A handler that fails, after retries, on this many single records with the same exception
type within this many seconds (across batches and shards) is broken, not the data."""
OTHER_TYPES_LOGGED: Final = 100
"""Distinct other CloudEvent types whose first record is logged (``other_event_type_skipped``)."""
OUTAGE_GAP_FLOOR: Final = 600.0
"""Least ``outage_gap``: far longer than a held batch takes to be tried again."""
DEFAULT_OUTAGE_PATIENCE = 600.0
"""Seconds batches wait for a handler taken to be broken before the records it fails on
are dead-lettered after all (``SUPERSIM_HANDLER_OUTAGE_PATIENCE``)."""


class HandlerUnavailable(RetriableError):
    """A handler's infrastructure kept failing; the batch is not checkpointed."""


class HandlerTimeout(RetriableError):
    """A handler call took longer than ``handler_timeout``: an outage, never the record's
    fault (retried with backoff, never dead-lettered)."""


@dataclass(slots=True)
class BatchOutcome:
    records: int = 0
    handled: int = 0
    dead_lettered: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)


class BatchProcessor:
    """Runs the handlers over one batch at a time. Shared by all shard readers."""

    def __init__(
        self,
        handlers: Sequence[Handler],
        dead_letters: DeadLetterStore,
        metrics: Metrics,
        attempts: int = 3,
        backoff: Backoff | None = None,
        outage_patience: float = DEFAULT_OUTAGE_PATIENCE,
        timeout: float = 60.0,
    ) -> None:
        self.handlers = list(handlers)
        self._timeout = timeout
        self._dlq = dead_letters
        self._metrics = metrics
        self.metrics = metrics
        self._attempts = attempts
        self._backoff = backoff or Backoff(base=0.2, cap=5.0)
        self._log = structlog.get_logger("worker.consumer.pipeline")
        self._other_types: set[str] = set()
        """The other CloudEvent types skipped so far (their first record was logged)."""
        self._patience = outage_patience
        self.outage_gap = max(2 * outage_patience, OUTAGE_GAP_FLOOR)
        """Seconds without the handler looking broken on a shard after which that shard's
        outage is over anyway (the shard moved to another replica and back, say)."""
        self._outages: dict[tuple[str, str], _Outage] = {}
        """Per handler and shard where the handler is taken to be broken: that outage."""
        self._poisoned: dict[str, dict[tuple[str, str], tuple[float, str]]] = {}
        """Per handler, per record (shard, sequence number), oldest first: when it last
        failed, with which exception type. Keyed by record, so that a batch retried for
        another reason (a full dead-letter store, a Redis blip) does not count twice."""

    async def decode_all(
        self, shard_id: str, records: Sequence[RawRecord], outcome: BatchOutcome
    ) -> tuple[Batch, list[DeadLetter]]:
        """Decode a batch, ``DECODE_CHUNK`` records between two turns of the event loop:
        a 10,000-record batch decoded in one go would hold the loop for a quarter of a
        second (seconds on a loaded machine), and every shard's lease renewal with it.

        Each event's kind and the latest event time are noted as each event is made, while
        the CPU's caches still hold it (``Batch.decoded``): walking the decoded batch for them
        afterwards costs about a microsecond per event and walk."""
        events: list[ConnectionEvent] = []
        kinds: list[EventKind] = []
        latest: datetime | None = None
        letters: list[DeadLetter] = []
        for at in range(0, len(records), DECODE_CHUNK):
            if at:
                await asyncio.sleep(0)
            for record in records[at : at + DECODE_CHUNK]:
                data, sequence_number, partition_key, arrival = record
                try:
                    event = decode(
                        data, new_kinesis_meta(shard_id, sequence_number, partition_key, arrival)
                    )
                except DecodeError as exc:
                    letters.append(_letter(record, shard_id, exc.reason, DECODE, exc))
                    self._metrics.decode_errors.labels(reason=_reason(exc)).inc()
                    continue
                if event.__class__ is ConnectionEvent:
                    events.append(event)
                    kinds.append(event.kind)
                    at_time = event.envelope.data.timestamp
                    if latest is None or at_time > latest:
                        latest = at_time
                elif isinstance(event, SinkTestEvent):
                    outcome.skipped["sink_test"] += 1
                else:
                    outcome.skipped["other_type"] += 1
                    if isinstance(event, OtherEvent):
                        self._note_other_type(event)
        for kind, count in Counter(kinds).items():
            outcome.kinds[kind.value] += count
        return Batch.decoded(shard_id, events, kinds, latest), letters

    def _note_other_type(self, event: OtherEvent) -> None:
        """Log the first record of each CloudEvent type that is not a connection event, so
        what the counter ``supersim_records_skipped_total{reason="other_type"}`` skips can be
        told apart (another product's events, or a connection event with a misspelt type);
        the first ``OTHER_TYPES_LOGGED`` types only, so a stream of many never floods the log."""
        shown = event.type[:200]  # kept and logged: a type is no longer in a real stream
        if shown in self._other_types or len(self._other_types) >= OTHER_TYPES_LOGGED:
            return
        self._other_types.add(shown)
        assert event.meta is not None  # events from records always carry it
        self._log.info(
            "other_event_type_skipped",
            type=shown,
            shard_id=event.meta.shard_id,
            sequence_number=event.meta.sequence_number,
            types_seen=len(self._other_types),
        )

    async def process(self, shard_id: str, records: Sequence[RawRecord]) -> BatchOutcome:
        """Handle one batch completely; returns when it may be checkpointed."""
        outcome = BatchOutcome(records=len(records))
        batch, letters = await self.decode_all(shard_id, records, outcome)
        events = batch.events
        poisoned: dict[tuple[str, str], DeadLetter] = {}
        """One entry per record and handler failing on it: a redrive re-runs each."""
        raw: dict[str, RawRecord] = {}
        """The batch's records by sequence number, once a handler has failed on one."""
        if events:
            for handler in self.handlers:
                key = (handler.name, shard_id)
                outage = self._outages.get(key)
                calls = outage.calls if outage is not None else 0
                failed = await self._run(handler, batch, self._attempts)
                if len(failed) == len(batch) >= BROKEN_HANDLER_BATCH:
                    # Every record of a sizeable batch failing is the handler's fault (a bad
                    # deploy, a dependency down), not the data's: keep the batch, retry later.
                    self._outage(
                        handler,
                        shard_id,
                        f"handler {handler.name} failed on all {len(batch)} events of the "
                        f"batch: {type(failed[0][1]).__name__}: {failed[0][1]}",
                        failed[0][1],
                    )
                elif (
                    outage is not None
                    and self._outages.get(key) is outage
                    and outage.calls == calls
                ):
                    # A batch of this shard went through without the handler looking broken
                    # here: the shard's outage is over.
                    self._outages.pop(key, None)
                if failed and not raw:
                    raw = {record.sequence_number: record for record in records}
                for event, exc in failed:
                    assert event.meta is not None  # events from records always carry it
                    record = raw[event.meta.sequence_number]
                    reason = f"handler {handler.name} failed on this record after retries"
                    letter = _letter(record, shard_id, reason, handler.name, exc)
                    poisoned.setdefault((record.sequence_number, handler.name), letter)
        # Written once the batch is done, so a batch retried after a handler outage does not
        # dead-letter its undecodable records again.
        await self._dlq.add([*letters, *poisoned.values()])
        outcome.dead_lettered = len(letters) + len(poisoned)
        outcome.handled = len(events) - len({sequence for sequence, _ in poisoned})
        self._metrics.incr("records", outcome.records)
        self._metrics.incr("events_handled", outcome.handled)
        self._metrics.events_handled.labels(shard=shard_id).inc(outcome.handled)
        if letters:
            self._metrics.records_dead_lettered.labels(handler=DECODE).inc(len(letters))
        for _, name in poisoned:
            self._metrics.records_dead_lettered.labels(handler=name).inc()
        for name, count in outcome.skipped.items():
            self._metrics.incr(f"skipped_{name}", count)
            self._metrics.records_skipped.labels(reason=name).inc(count)
        for kind, count in outcome.kinds.items():
            self._metrics.incr(f"kind:{kind}", count)
        return outcome

    async def _run(
        self, handler: Handler, batch: Batch, attempts: int
    ) -> list[tuple[ConnectionEvent, Exception]]:
        """Handle ``batch`` with ``handler``; return the events it keeps failing on."""
        error: Exception | None = None
        for attempt in range(1, attempts + 1):
            began = time.perf_counter()
            try:
                await self._bounded(handler, batch)
            except (Exception, asyncio.CancelledError) as caught:
                self._metrics.handler_duration.labels(handler=handler.name).observe(
                    time.perf_counter() - began
                )
                self._metrics.handler_failures.labels(handler=handler.name).inc()
                exc = _as_handler_error(caught)
                error = exc
                infra = is_infrastructure_failure(exc)
                self._log.warning(
                    "handler_failed",
                    handler=handler.name,
                    shard_id=batch.shard_id,
                    events=len(batch),
                    attempt=attempt,
                    attempts_left=attempts - attempt,
                    infrastructure=infra,
                    error=f"{type(exc).__name__}: {exc}",
                )
                if attempt < attempts:
                    await asyncio.sleep(self._backoff.delay(attempt))
                    continue
                if infra:
                    self._metrics.handler_outages.labels(handler=handler.name).inc()
                    raise HandlerUnavailable(
                        f"handler {handler.name} kept failing: {type(exc).__name__}: {exc}"
                    ) from exc
            else:
                self._metrics.handler_duration.labels(handler=handler.name).observe(
                    time.perf_counter() - began
                )
                return []
        assert error is not None
        if len(batch) == 1:
            self._note_poisoned(handler, batch.events[0], error)
            return [(batch.events[0], error)]
        left, right = batch.split()
        # Halves get one try; a lone record gets the full retries before it is dead-lettered.
        return [
            *await self._run(handler, left, 1 if len(left) > 1 else self._attempts),
            *await self._run(handler, right, 1 if len(right) > 1 else self._attempts),
        ]

    async def _bounded(self, handler: Handler, batch: Batch) -> None:
        """``handler.handle(batch)`` within ``handler_timeout``. Whether the time ran out
        is told by the timer, not by what the handler did with its cancellation: one that
        swallowed it and returned, or turned it into another error, is timed out all the
        same (never a success to checkpoint, never a record's fault to dead-letter)."""
        timer = asyncio.timeout(self._timeout)
        try:
            async with timer:
                await handler.handle(batch)
        except (Exception, asyncio.CancelledError) as caught:
            if timer.expired():
                raise self._timed_out(handler) from caught
            raise
        if timer.expired():
            raise self._timed_out(handler)

    def _timed_out(self, handler: Handler) -> HandlerTimeout:
        self._metrics.handler_timeouts.labels(handler=handler.name).inc()
        return HandlerTimeout(
            f"handler {handler.name} took longer than {self._timeout:g} s "
            "(SUPERSIM_HANDLER_TIMEOUT)"
        )

    def _note_poisoned(self, handler: Handler, event: ConnectionEvent, error: Exception) -> None:
        """Count a record ``handler`` failed on; when the same exception type has failed
        ``BROKEN_HANDLER_RECORDS`` distinct records in the window, the handler is taken to
        be broken (``_outage``)."""
        assert event.meta is not None  # events from records always carry it
        now = time.monotonic()
        recent = self._poisoned.setdefault(handler.name, {})
        key = (event.meta.shard_id, event.meta.sequence_number)
        recent.pop(key, None)  # re-inserted last: the dict stays oldest first
        name = type(error).__name__
        recent[key] = (now, name)
        for old in list(recent):
            if recent[old][0] >= now - BROKEN_HANDLER_WINDOW and len(recent) <= 1024:
                break
            del recent[old]
        count = sum(1 for _, seen in recent.values() if seen == name)
        try:
            if count >= BROKEN_HANDLER_RECORDS:
                self._outage(
                    handler,
                    event.meta.shard_id,
                    f"handler {handler.name} failed with {name} on {count} records within "
                    f"{BROKEN_HANDLER_WINDOW:.0f} s",
                    error,
                )
        finally:
            outage = self._outages.get((handler.name, event.meta.shard_id))
            if outage is not None:  # failures keep a slow outage's clock going
                outage.bad_at = now

    def _outage(self, handler: Handler, shard_id: str, what: str, error: Exception) -> None:
        """Raise ``HandlerUnavailable`` (the batch waits and is retried), unless the handler
        has been taken to be broken on this shard for ``outage_patience`` already: then
        return, and the records it fails on are dead-lettered. The clock, one per handler
        and shard, starts at the first such call and stops when a batch of the shard goes
        through the handler without it looking broken (``process``); a call after
        ``outage_gap`` seconds without a failure there starts a new one. Other shards'
        batches going through do not stop it: they may be other records than the ones
        failing, and a batch held back would then wait afresh after each of them, for
        good."""
        now = time.monotonic()
        key = (handler.name, shard_id)
        outage = self._outages.get(key)
        if outage is None or now - outage.bad_at >= self.outage_gap:
            outage = self._outages[key] = _Outage(since=now, bad_at=now)
        outage.bad_at = now
        outage.calls += 1
        since = outage.since
        if now - since < self._patience:
            self._metrics.handler_outages.labels(handler=handler.name).inc()
            raise HandlerUnavailable(
                f"{what}: treated as an outage, the batch waits (for at most "
                f"{self._patience - (now - since):.0f} s more): {error}"
            ) from error
        if not outage.logged:
            outage.logged = True
            self._log.error(
                "handler_outage_patience_exhausted",
                handler=handler.name,
                shard_id=shard_id,
                broken_for=round(now - since, 1),
                error=f"{type(error).__name__}: {error}",
                hint="the records it fails on here are dead-lettered until a batch of this "
                "shard goes through it; "
                "redrive them with `supersim-worker dlq redrive` once it is fixed",
            )


@dataclass(slots=True)
class _Outage:
    """A handler taken to be broken on one shard."""

    since: float
    """When it first was, in this outage."""
    bad_at: float
    """When a record last failed it there, or it last looked broken there; the outage is
    over once ``outage_gap`` passes from this (or a batch of the shard goes through)."""
    calls: int = 0
    """``_outage`` calls so far: a batch during which there was none went through without
    the handler looking broken there."""
    logged: bool = False
    """Whether its patience running out was logged."""


def _as_handler_error(caught: BaseException) -> Exception:
    """A handler's exception, or a CancelledError it raised without this task being
    cancelled (e.g. from a future something else cancelled): that is a handler failure.
    A real cancellation of this task is re-raised."""
    if isinstance(caught, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise caught
        return RuntimeError(f"handler raised CancelledError: {caught}")
    assert isinstance(caught, Exception)
    return caught


def _letter(
    record: RawRecord, shard_id: str, reason: str, handler: str, exc: BaseException
) -> DeadLetter:
    return DeadLetter(
        raw=record.data,
        shard_id=shard_id,
        sequence_number=record.sequence_number,
        partition_key=record.partition_key,
        arrival=record.arrival,
        reason=reason,
        handler=handler,
        exception=f"{type(exc).__name__}: {exc}",
    )


def _reason(exc: DecodeError) -> str:
    """A decode failure as a bounded label: the field at fault (``type``, ``data``,
    ``data.sim_sid``...), or ``record`` when the record as a whole is (not JSON, too big).
    Never the message, which may quote the record."""
    field = exc.field or "record"
    return (
        field if len(field) <= 60 and field.replace(".", "").replace("_", "").isalnum() else "field"
    )
