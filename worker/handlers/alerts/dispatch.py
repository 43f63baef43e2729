"""Delivering claimed outbox entries to their sinks, off the batch path.

``handle`` only records transitions and claims due entries (one round trip); the
dispatcher's background task renders each claimed entry, sends it to its sink and
settles the round in the outbox (one more round trip per round, not per batch). A slow
or failing webhook therefore never holds up the shard.

Guarantees: an entry is claimed by one replica at a time (lease). A replica claims only
what one round can deliver within a lease: at most ``concurrency`` entries in all, only
while nothing it claimed earlier is still queued or in flight (``reserve``), and its own
claim only for the room left in the next round; each send is bounded by the webhook's
``round_seconds``, shorter than the lease. And an entry is sent only while its claim still
has that long to run, plus a margin (``SEND_MARGIN_MS``): one that waited too long (a
stalled process, a delivery task that had to be restarted) is handed back at once instead
(due now, not counted as a failed round), so no other replica can claim an entry again
while it is being sent. A full round claims the next one itself, so a
backlog drains without waiting for the next batch or tick. A batch or tick that finds the
dispatcher busy claims nothing; once its transitions are written (``release``) it asks for
a claim, which the task makes after its current round, so nothing written waits for the
next batch or tick. A resolution whose opening is still pending (claimed by another
replica, or failing) is not tried; it is due again once its opening is delivered, and
the round that settles that (this replica's or another's) claims again, so it follows its
opening at once instead of when the other replica's claim runs out. A resolution whose
opening was given up is given up with it (``outbox.lua``). Within a round, openings are
sent and settled before resolutions, so a local sink (the stream's append happens as the
round settles) gets them in that order too. Each settlement carries its claim's fence and
is ignored if another replica claimed the entry since (``alert_settlement_stale``). A
shutdown mid-round settles what the round had already delivered, and a closing
dispatcher claims nothing more; a process that dies mid-round leaves its claims to expire
and be claimed again, so every entry is delivered at least once and, through the stream
sink's atomic append and the webhook's idempotency key, observed once. The task is owned
here: ``close`` waits for it (bounded), then cancels it. A Redis error while a round is
under way never cuts the round's other sends short (they are settled, or repeated after
their claim); a sink that raises (a bug) leaves its entry claimed, the rest of the round
goes on, and the error surfaces on the next ``check`` (each batch or tick) or ``flush``; a
task that died is started again by the next ``release`` or ``flush``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import structlog
from redis.exceptions import RedisError

from worker.handlers.alerts.episodes import Transition
from worker.handlers.alerts.model import Alert
from worker.handlers.alerts.outbox import (
    ORPHANED,
    ClaimedEntry,
    Outbox,
    Outcome,
    Settled,
    Settlement,
)
from worker.handlers.alerts.sinks import AlertSink

Render = Callable[[Transition], Alert]

SEND_MARGIN_MS = 5_000
"""A send starts only if its claim still runs at least this long after the send's own
bound: room for clocks that differ between replicas and for settling the result."""
CANCELLED_SETTLE_S = 2.0
"""How long a round cut short by a shutdown tries to settle what it delivered; past that
(Redis unreachable) those deliveries are repeated after their claim."""


def _openings_first(entries: Sequence[ClaimedEntry]) -> list[ClaimedEntry]:
    """The entries in claim order, but a resolution claimed with its opening just after
    that opening: so it waits for that send, and is settled after it (a local sink, such as
    the stream, delivers as the round settles)."""
    in_round = {entry.entry for entry in entries}
    placed: set[str] = set()
    deferred: dict[str, ClaimedEntry] = {}
    ordered: list[ClaimedEntry] = []
    for entry in entries:
        opening = entry.opening_entry
        if opening is not None and opening in in_round and opening not in placed:
            deferred[opening] = entry
            continue
        ordered.append(entry)
        placed.add(entry.entry)
        if (follower := deferred.pop(entry.entry, None)) is not None:
            ordered.append(follower)
    return ordered


class RetryPolicy:
    """When a failed entry is due again, and when it is given up on."""

    def __init__(self, base: timedelta, cap: timedelta, max_age: timedelta) -> None:
        self._base_ms = base.total_seconds() * 1000
        self._cap_ms = cap.total_seconds() * 1000
        self._max_age_ms = max_age.total_seconds() * 1000

    def next_due(self, now_ms: int, tries: int, rng: random.Random | None = None) -> int:
        """Exponential from ``base``, capped, with equal jitter (half fixed, half random),
        so alerts that failed together in an outage do not all come due together."""
        delay: float = min(self._cap_ms, self._base_ms * 2.0 ** min(tries, 32))
        return now_ms + round(delay / 2 + (rng or random).random() * delay / 2)

    def expired(self, now_ms: int, created_ms: int) -> bool:
        return now_ms - created_ms > self._max_age_ms


class Dispatcher:
    """Delivers claimed entries in a background task, a round at a time."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        sinks: Mapping[str, AlertSink],
        render: Render,
        retry: RetryPolicy,
        lease_ms: int,
        send_ms: int,
        clock: Callable[[], float] = time.time,
        concurrency: int = 8,
    ) -> None:
        """``send_ms`` bounds one send (the webhook's ``round_seconds``): an entry is sent
        only while its claim runs ``send_ms + SEND_MARGIN_MS`` longer."""
        self._outbox = outbox
        self._sinks = dict(sinks)
        self._render = render
        self._retry = retry
        self._clock = clock
        self._limit = asyncio.Semaphore(concurrency)
        self._round = concurrency
        if lease_ms < 2 * (send_ms + SEND_MARGIN_MS):
            # A resolution may wait one send for its opening before its own: with less, a
            # fresh claim could be handed back, claimed again, and handed back, forever.
            raise ValueError(
                f"a claim's lease ({lease_ms} ms) must be at least twice a send's bound plus "
                f"{SEND_MARGIN_MS} ms ({2 * (send_ms + SEND_MARGIN_MS)} ms)"
            )
        self._lease_ms = lease_ms
        self._send_ms = send_ms
        self._reserved = False
        self._unreserved = asyncio.Event()
        self._unreserved.set()
        self._claim_asked = False
        """A claim is queued: a batch or tick wrote transitions while it could not claim."""
        self._claiming = False
        """The task's own claim is under way (no reservation is given meanwhile)."""
        self._released = 0
        """Resolutions the current round's settlements made due (their opening went out),
        and entries it handed back unsent (their claim was running out): claim again."""
        self._queue: asyncio.Queue[ClaimedEntry | None] = asyncio.Queue()
        self._queued: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        """A sink's or the task's error, raised once by the next ``check``."""
        self._closed = False
        self.deliveries: Counter[tuple[str, str]] = Counter()
        """Delivery rounds by (sink, outcome), for the metrics."""
        self._log = structlog.get_logger("worker.handlers.alerts")

    def reserve(self) -> int:
        """How many entries the caller may claim for this dispatcher now: one round's worth
        when it is idle and no other claim is under way, else 0. Every call is followed by
        ``release`` (or ``submit``) with the limit it got, once the caller's transitions
        are written."""
        if self._closed or self._reserved or self._claiming or self._queued or self._claim_asked:
            return 0
        self._reserved = True
        self._unreserved.clear()
        return self._round

    def submit(self, entries: Sequence[ClaimedEntry], limit: int) -> None:
        """``release``, then raise if the delivery task failed."""
        self.release(entries, limit)
        self.check()

    def release(self, entries: Sequence[ClaimedEntry], limit: int) -> None:
        """End a ``reserve`` that gave ``limit``: queue what was claimed (ones already
        queued here are skipped). With a limit of 0 the caller could not claim, so a claim
        is queued: the caller's entries exist now, and the round under way (or a claim
        running concurrently) may have looked before they did. Never raises."""
        if limit:
            self._reserved = False
            self._unreserved.set()
        if self._closed:
            return
        for entry in entries:
            if entry.entry not in self._queued:
                self._queued.add(entry.entry)
                self._queue.put_nowait(entry)
        if not limit and not self._claim_asked:
            self._claim_asked = True
            self._queue.put_nowait(None)
        self._reap()
        self._start()

    def _start(self) -> None:
        """Start a delivery task if none runs and something is queued."""
        if self._task is None and not self._queue.empty() and not self._closed:
            self._task = asyncio.create_task(self._run(), name="alert-dispatcher")

    def _reap(self) -> None:
        """Forget a task that ended, keeping its error for ``check``: what it left queued
        goes to the next task."""
        task = self._task
        if task is not None and task.done():
            self._task = None
            if not task.cancelled() and (exc := task.exception()) is not None:
                self._log.error(
                    "alert_dispatcher_failed",
                    error=f"{type(exc).__name__}: {exc}",
                    note="started again; what it left queued is delivered by the next task",
                )
                self._failure = self._failure or exc

    async def flush(self) -> None:
        """Wait until everything submitted so far has been delivered or settled."""
        self.check()
        self._start()
        if self._task is None:
            return
        joined = asyncio.ensure_future(self._queue.join())
        try:
            await asyncio.wait({joined, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            joined.cancel()
        self.check()

    async def close(self, grace: float) -> None:
        """Finish the queued rounds within ``grace`` seconds, then stop the task.

        Entries not settled by then stay claimed in Redis and are delivered after their
        lease ends, by this or another replica.
        """
        self._closed = True
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():  # a dead task finishes nothing: no grace to wait out
            joined = asyncio.ensure_future(self._queue.join())
            try:
                await asyncio.wait(
                    {joined, task}, timeout=grace, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                joined.cancel()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # it failed before: say so, and let the sinks close
            self._log.error("alert_dispatcher_failed", error=f"{type(exc).__name__}: {exc}")

    def check(self) -> None:
        """Raise if a sink or the delivery task failed since the last check (once; a
        dead task is started again by the next ``release``)."""
        self._reap()
        exc, self._failure = self._failure, None
        if exc is not None:
            raise RuntimeError("the alert dispatcher failed") from exc

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            entries = int(items[0] is not None)
            while not self._queue.empty() and entries < self._round:
                item = self._queue.get_nowait()
                items.append(item)
                entries += item is not None
            round_ = [item for item in items if item is not None]
            asked = len(round_) < len(items)
            if asked:
                # At once, whatever happens to this round: an ask from now on queues a new
                # claim (never left set by a failed round, which would stop claims for good).
                self._claim_asked = False
            self._released = 0
            settled = False
            try:
                tried = await self._deliver(round_) if round_ else 0
                claim = (len(round_) >= self._round and tried) or asked or self._released
                # Settled: any claim, ours or a batch's, may take them again from now on (one
                # released to wait for its opening, or just due again, must not be skipped
                # as still queued here while its new claim runs out). Ones the claim below
                # takes again are queued again, and stay so.
                self._queued.difference_update(entry.entry for entry in round_)
                settled = True
                if claim and not self._closed:
                    # One claim at a time: none is reserved from here on, and a batch or tick
                    # holding a reservation claims in its own script; ours follows it.
                    self._claiming = True
                    await self._unreserved.wait()
                    await self._claim_next()
            finally:
                self._claiming = False
                if not settled:
                    self._queued.difference_update(entry.entry for entry in round_)
                for _ in items:
                    self._queue.task_done()

    async def _claim_next(self) -> int:
        """After a full round, when asked, or when the round released resolutions that
        waited for their opening or handed back entries whose claim was running out, claim
        the next one (queued before this round is marked
        done, so ``flush`` waits for it too). A closing dispatcher claims nothing: what it
        claimed might sit claimed for a whole lease once the grace runs out."""
        if self._closed:
            return 0
        room = self._round - len(self._queued)
        if room <= 0:
            # A batch's claim filled the next round meanwhile: claim after that one, so
            # no round holds more than one round's worth (each sized for a lease).
            if not self._claim_asked:
                self._claim_asked = True
                self._queue.put_nowait(None)
            return 0
        try:
            claimed = await self._outbox.claim(round(self._clock() * 1000), room, self._lease_ms)
        except RedisError as exc:
            self._log.warning("alert_claim_failed", error=f"{type(exc).__name__}: {exc}")
            return 0  # the next batch or tick claims them
        for entry in claimed:
            if entry.entry not in self._queued:
                self._queued.add(entry.entry)
                self._queue.put_nowait(entry)
        return len(claimed)

    async def _deliver(self, entries: list[ClaimedEntry]) -> int:
        """Deliver one round; returns how many entries were tried (not left waiting)."""
        in_round = {entry.entry for entry in entries}
        earlier = [
            opening
            for entry in entries
            if (opening := entry.opening_entry) is not None and opening not in in_round
        ]
        try:
            undelivered = await self._outbox.undelivered_among(earlier)
        except RedisError as exc:
            self._log.warning("alert_round_skipped", error=f"{type(exc).__name__}: {exc}")
            return 0  # nothing sent: delivered when the claims run out
        sends: dict[str, asyncio.Future[Settlement]] = {}
        for entry in _openings_first(entries):
            opening = entry.opening_entry
            sends[entry.entry] = asyncio.ensure_future(
                self._one(
                    entry,
                    sends.get(opening) if opening else None,
                    undelivered.get(opening) if opening else None,
                )
            )
        try:
            outcomes = await asyncio.gather(*sends.values(), return_exceptions=True)
            gathered: list[Settlement] = []
            for entry_id, outcome in zip(sends, outcomes, strict=True):
                if isinstance(outcome, Settlement):
                    gathered.append(outcome)
                    continue
                # A bug (sinks report failures as results): the entry stays claimed and is
                # tried again after its claim, the others are settled; check() raises it.
                self._log.error(
                    "alert_delivery_error",
                    entry=entry_id,
                    error=f"{type(outcome).__name__}: {outcome}",
                    note="tried again when its claim expires",
                )
                if not isinstance(outcome, asyncio.CancelledError):
                    self._failure = self._failure or outcome
            for result in gathered:
                self.deliveries[(result.entry.split("|", 1)[0], result.outcome.value)] += 1
            results = [result for result in gathered if not result.settled]
            tried = sum(result.outcome is not Outcome.WAIT for result in gathered)
        except asyncio.CancelledError:
            # A shutdown cut the round short: settle what was delivered (or failed) before
            # it, so only the sends still in flight are repeated after their claim.
            finished = [
                result
                for send in sends.values()
                if send.done() and not send.cancelled() and send.exception() is None
                if not (result := send.result()).settled
            ]
            if finished:
                with contextlib.suppress(RedisError, TimeoutError):
                    settling = self._outbox.settle(finished, round(self._clock() * 1000))
                    await asyncio.wait_for(settling, CANCELLED_SETTLE_S)
            raise
        finally:
            for send in sends.values():
                send.cancel()
        now_ms = round(self._clock() * 1000)
        try:
            settled = await self._outbox.settle(results, now_ms)
        except RedisError as exc:
            self._log.warning(
                "alert_settle_failed",
                entries=len(results),
                error=f"{type(exc).__name__}: {exc}",
                note="deliveries are repeated when their claims expire",
            )
            return tried
        self._account(settled)
        return tried

    def _account(self, settled: Settled) -> None:
        """Note what a settlement did: resolutions it made due (the round claims again),
        resolutions given up with their opening, hopeless entries held, results ignored as
        stale."""
        self._released += settled.released
        for entry in settled.orphans:
            self._log.error("alert_delivery_dead", entry=entry, reason=ORPHANED)
        if settled.held:
            self._log.error(
                "alert_dead_store_full",
                held=settled.held,
                note="undeliverable alerts stay pending and are tried again later; "
                "inspect them with `supersim-worker alerts dead`, then redrive or delete",
            )
        for entry in settled.stale:
            self.deliveries[(entry.split("|", 1)[0], "stale")] += 1
        if settled.stale:
            self._log.warning(
                "alert_settlement_stale",
                entries=list(settled.stale),
                note="their claim ran out and another replica claimed them: that one settles them",
            )

    async def _one(
        self,
        entry: ClaimedEntry,
        opening: asyncio.Future[Settlement] | None,
        opening_due: int | None,
    ) -> Settlement:
        """Deliver one entry (``_outcome``); a remote sink's outcome is settled at once, so
        a slow receiver does not keep what it accepted unsettled until the round ends."""
        settlement = await self._outcome(entry, opening, opening_due)
        sink = self._sinks.get(entry.sink)
        if sink is None or not sink.remote:
            return settlement
        try:
            settled = await self._outbox.settle([settlement], round(self._clock() * 1000))
            self._account(settled)
        except RedisError as exc:
            self._log.warning(
                "alert_settle_failed",
                entries=1,
                error=f"{type(exc).__name__}: {exc}",
                note="the delivery is repeated when its claim expires",
            )
        return dataclasses.replace(settlement, settled=True)

    async def _outcome(
        self,
        entry: ClaimedEntry,
        opening: asyncio.Future[Settlement] | None,
        opening_due: int | None,
    ) -> Settlement:
        """How the entry's delivery went. A resolution is sent only once its opening is
        delivered, so a receiver never sees an alert resolved before it opened:
        ``opening`` is that send when it is in the same round, else ``opening_due`` is
        when the outbox's opening is due next (0 if it was given up, None once it was
        delivered). A waiting resolution is due again just after its opening, at once when
        the opening is delivered, whoever delivers it, and given up with it if the opening
        is given up (``outbox.lua``)."""
        if entry.opening_entry is not None:
            if opening is not None:
                sent = await asyncio.shield(opening)
                waits_for = None if sent.outcome is Outcome.DONE else sent.due_ms
            else:
                waits_for = opening_due
            if waits_for is not None:
                due = max(waits_for, round(self._clock() * 1000)) + 1
                return Settlement(entry.entry, Outcome.WAIT, entry.fence, due_ms=due)
        sink = self._sinks.get(entry.sink)
        if sink is None:
            return Settlement(
                entry.entry, Outcome.DEAD, entry.fence, reason=f"sink {entry.sink} is not enabled"
            )
        try:
            transition = Transition.parse(entry.payload)
            alert = self._render(transition)
        except (ValueError, KeyError, TypeError) as exc:
            return Settlement(
                entry.entry, Outcome.DEAD, entry.fence, reason=f"cannot render: {exc}"
            )
        async with self._limit:
            now_ms = round(self._clock() * 1000)
            if now_ms + self._send_ms + SEND_MARGIN_MS > entry.fence:
                # Its claim could run out while it is sent, and another replica claim it:
                # hand it back, due at once (ours or another replica's next claim takes it).
                self._released += 1
                self._log.warning("alert_claim_running_out", entry=entry.entry)
                return Settlement(entry.entry, Outcome.WAIT, entry.fence, due_ms=now_ms)
            result = await sink.send(alert)
        if result.delivered:
            return Settlement(
                entry.entry, Outcome.DONE, entry.fence, stream_fields=result.stream_fields
            )
        now_ms = round(self._clock() * 1000)
        fields = {
            "alert_id": alert.id,
            "status": alert.status.value,
            "sink": sink.name,
            "reason": result.reason,
            "failed_rounds": entry.tries + 1,
        }
        if not result.retriable:
            self._log.error("alert_delivery_dead", **fields)
            return Settlement(entry.entry, Outcome.DEAD, entry.fence, reason=result.reason)
        try:
            since = max(transition.created_ms, await self._outbox.requeued_at(entry.entry))
        except RedisError as exc:  # an outage: not given up on for its age this round
            self._log.warning(
                "alert_age_unknown", entry=entry.entry, error=f"{type(exc).__name__}: {exc}"
            )
            since = now_ms
        if self._retry.expired(now_ms, since):
            reason = f"undelivered for longer than the maximum age (last: {result.reason})"
            self._log.error("alert_delivery_dead", **(fields | {"reason": reason}))
            return Settlement(entry.entry, Outcome.DEAD, entry.fence, reason=reason)
        due = self._retry.next_due(now_ms, entry.tries)
        self._log.warning("alert_delivery_deferred", retry_in_s=(due - now_ms) / 1000, **fields)
        return Settlement(entry.entry, Outcome.RETRY, entry.fence, due_ms=due, reason=result.reason)
