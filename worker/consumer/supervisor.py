"""The supervisor: discovers shards and owns one reader task per shard.

It lists the stream's shards (every ``discovery_interval``, and at once when a shard ends),
and every ``BALANCE_INTERVAL`` runs a balancing round: it reads the group's leases and live
replicas (two cheap Redis calls, O(shards)), and takes or asks for leases so that each
replica reads about as many shards as the others (see ``worker.consumer.balance``); when
ListShards fails, with the shards last listed (leases need Redis alone), so its steal
requests stay refreshed and it takes what is handed over to it. This replica's own
heartbeat is the lease keeper's, with the renewals: it never waits on Kinesis, so a
ListShards outage does not make the peers take this replica for dead. A round also runs as
soon as another replica's lease or heartbeat lapses (read in the last round), so a crashed
replica's shards are taken the moment its leases expire. It starts, reaps and restarts the
readers. It takes each shard's lease through the ``LeaseKeeper``
(``worker.consumer.lease_keeper``), which renews the leases of running readers, stops a
reader whose lease is lost and hands over one another replica asked for; where each reader
starts comes from ``StartPositions`` (``worker.consumer.positions``). Handlers that are
``ShardListener``s hear when a shard starts and stops being read here, each call bounded by
``handler_timeout`` (once a stop is asked for, by what is left of ``shutdown_timeout``); a
lease is renewed from the moment it is taken, also while ``on_shards_assigned`` runs.

Ordering guarantee: a child shard (after a split or merge) starts only when every parent
is at ``SHARD_END`` or no longer exists (trimmed), so per partition key nothing is read
out of order across a reshard. Discovery runs every ``discovery_interval`` and at once
when a shard ends, on every replica (the others see its ``SHARD_END`` checkpoint at their
next balancing round), so children start within a second or two of their last parent
ending, whichever replica has room for them.

Reader failures are logged and the reader is restarted with backoff from its last
checkpoint; the process keeps running. ``stop()`` stops reading; the shutdown leaves the
live set at once (this replica's steal requests are then void), lets each in-flight batch
finish (bounded by ``shutdown_timeout``), checkpoints and releases the leases, so the other
replicas take the shards within a balancing round. A reader still running at the bound is
cancelled and given ``ABANDON_GRACE`` to end; one that ignores its cancellation (a handler
swallowing it) is abandoned, so it never holds up the releases.

A shard's lag series (``supersim_shard_millis_behind_latest``,
``supersim_shard_iterator_age_seconds``) is removed once this replica no longer reads it:
handed over, lost, ended, at shutdown, or (after its reader failed) once another replica
holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from worker import keys
from worker.backoff import Backoff
from worker.consumer.balance import plan
from worker.consumer.checkpoints import CheckpointMoved, Checkpoints, LeaseLost
from worker.consumer.kinesis import KinesisClient, ShardInfo, is_retriable, list_shards
from worker.consumer.lease_keeper import LeaseKeeper
from worker.consumer.leases import Lease, LeaseManager
from worker.consumer.pipeline import BatchProcessor
from worker.consumer.positions import StartPositions
from worker.consumer.shard_reader import ShardProgress, ShardReader
from worker.errors import is_infrastructure_failure
from worker.handlers.base import ShardListener
from worker.metrics import Metrics
from worker.settings import Settings

BALANCE_INTERVAL = 1.0
"""Seconds between balancing rounds (lease reads; ListShards has its own interval)."""
STEAL_BOUND_FACTOR = 2.0
"""Lease TTLs in a steal request's bound (``steal_bound``), for the owner to see the
request (its next renewal) and give the lease back once its batch is done."""
HANDLER_BACKOFF_CAP = 5.0
"""The longest pause between two tries of a handler call (the batch processor's backoff
cap, ``worker.consumer.pipeline``)."""
ABANDON_GRACE = 1.0
"""Seconds a reader (or a shard listener hook) cut off at its bound is given to end once
cancelled; one still running then ignores its cancellation and is abandoned."""

MIN_RESTART_DELAY = 0.2
"""Seconds before a shard's reader starts again, whatever ended the last one."""
LAPSE_MARGIN = 0.02
"""Seconds after another replica's lease or heartbeat lapses (Redis time, as read in the
last round) that the next round runs, if sooner than ``BALANCE_INTERVAL``."""


def steal_bound(settings: Settings, handlers: int) -> float:
    """Seconds a steal request stands before the owner's renewals are refused (the lease
    then expires and is taken as after a crash): long enough for the owner to see the
    request at its next renewal, finish the slowest batch it may legitimately be handling
    (each of the ``handlers``, one after the other, tried ``handler_attempts`` times, every
    call cut off at ``handler_timeout``, with the retry backoff in between), checkpoint and
    give the lease back. A live owner is never refused while such a batch runs, so the
    thief never reads a batch the owner is still handling; a dead owner stops renewing and
    loses the lease by expiry, whatever the bound. Only an owner stuck for longer (a
    handler ignoring its timeout, which /healthz reports) or bisecting a batch through slow
    failing handler calls is refused."""
    attempts = settings.handler_attempts
    batch = max(1, handlers) * (
        attempts * settings.handler_timeout + (attempts - 1) * HANDLER_BACKOFF_CAP
    )
    return STEAL_BOUND_FACTOR * settings.lease_ttl + settings.shutdown_timeout + batch


@dataclass(slots=True)
class _Running:
    reader: ShardReader
    task: asyncio.Task[bool]


class Supervisor:
    """Discovers the stream's shards and owns their readers, until stopped."""

    def __init__(
        self,
        *,
        settings: Settings,
        kinesis: KinesisClient,
        leases: LeaseManager,
        checkpoints: Checkpoints,
        processor: BatchProcessor,
        from_start: bool = False,
        at_timestamp: datetime | None = None,
        until_caught_up: bool = False,
        reader_factory: Callable[..., ShardReader] = ShardReader,
        listeners: Sequence[ShardListener] = (),
    ) -> None:
        self._settings = settings
        self._stream = settings.stream_name
        self._kinesis = kinesis
        self._lease_store = leases
        self._metrics: Metrics = processor.metrics
        self._leases = LeaseKeeper(
            leases, renew_interval=settings.lease_ttl / 4, metrics=self._metrics
        )
        self._steal_bound_ms = round(steal_bound(settings, len(processor.handlers)) * 1000)
        leases.steal_bound_ms = self._steal_bound_ms  # stored with each lease taken
        self._listeners = list(listeners)
        self._strays: set[asyncio.Future[None]] = set()
        """Listener hook calls that ignored their cancellation (see ``_tell``)."""
        self._lag_series: set[str] = set()
        """Shards whose lag series this replica may still export (``_drop_lag``)."""
        self._listed_at: float | None = None
        self._relist = True
        self._checkpoints = checkpoints
        self._processor = processor
        self._until_caught_up = until_caught_up
        self._reader_factory = reader_factory
        self._positions = StartPositions.for_run(
            settings,
            checkpoints,
            from_start=from_start,
            at_timestamp=at_timestamp,
            checkpointed_this_run=self._checkpointed_this_run,
        )
        self._running: dict[str, _Running] = {}
        self._ended: set[str] = set()
        self._restart_at: dict[str, float] = {}
        self._lapse_at: float | None = None
        """When another replica's lease or heartbeat lapses next (monotonic), as last read."""
        self._failures: dict[str, int] = {}
        self._shards: dict[str, ShardInfo] = {}
        self.progress: dict[str, ShardProgress] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stop_requested: float | None = None
        self._backoff = Backoff(base=0.5, cap=30.0)
        self._log = structlog.get_logger("worker.consumer.supervisor")
        self.caught_up = False
        self.replica_id = leases.owner
        self.abandoned: list[str] = []
        """Shards whose reader ignored its cancellation at shutdown and still runs."""

    def stop(self) -> None:
        """Ask for a graceful stop (idempotent): readers stop fetching at once, and a
        shard listing in progress is cut short. ``shutdown_timeout`` counts from here."""
        if self._stop_requested is None:
            self._stop_requested = time.monotonic()
        self._stopping.set()
        self._wake.set()
        for running in self._running.values():
            running.reader.stop()

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (``stop``)."""
        return self._stopping.is_set()

    async def stop_requested(self) -> None:
        """Return once a stop is asked for (at once if one was), also after ``run``."""
        await self._stopping.wait()

    async def run(self) -> None:
        """Run until stopped (or, with ``until_caught_up``, until every shard is at its tip)."""
        async with self._leases:  # renews the leases until the readers are shut down
            try:
                while not self._stopping.is_set():
                    # Cleared before the work, not after: a stop() or a reader finishing while
                    # the work awaits I/O must cut the wait below short, not be forgotten.
                    self._wake.clear()
                    try:
                        if await self._discover():
                            self.caught_up = True
                            self._log.info("caught_up", shards=len(self.progress))
                            break
                    except Exception as exc:
                        if not _worth_retrying(exc):
                            raise
                        self._log.warning("discovery_failed", error=f"{type(exc).__name__}: {exc}")
                    interval = 0.2 if self._until_caught_up else BALANCE_INTERVAL
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._next_wake(interval))
            finally:
                await self._shutdown()

    async def _discover(self) -> bool:
        """One round: collect finished readers, list the shards when due, balance the
        leases and start readers for the shards taken. True when ``until_caught_up`` and
        every shard is at its tip."""
        await self._reap()
        now = time.monotonic()
        listed = True
        if (
            self._relist
            or self._listed_at is None
            or now - self._listed_at >= self._settings.discovery_interval
        ):
            try:
                shards = await self._list_unless_stopped()
            except Exception as exc:
                if not self._shards or not _worth_retrying(exc):
                    raise
                # Leases need Redis alone: balance with the shards last listed, so this
                # replica still takes what is handed over to it and keeps its requests.
                self._log.warning("discovery_failed", error=f"{type(exc).__name__}: {exc}")
                listed = False  # nor can it tell whether every shard is at its tip
            else:
                if shards is None:
                    return False
                self._shards = {shard.shard_id: shard for shard in shards}
                self._listed_at, self._relist = now, False
        await self._balance()
        return listed and self._until_caught_up and await self.all_caught_up()

    async def _list_unless_stopped(self) -> list[ShardInfo] | None:
        """The stream's shards, or None if a stop comes first: a slow ListShards is then
        cancelled, so it does not eat into the shutdown budget. Only the listing is raced:
        lease and checkpoint calls are never cut off half-way."""
        listing = asyncio.create_task(list_shards(self._kinesis, self._stream), name="list")
        stopped = asyncio.create_task(self._stopping.wait(), name="list-stop")
        try:
            await asyncio.wait({listing, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (listing, stopped):
                if not waiting.done():
                    waiting.cancel()
            await asyncio.gather(listing, stopped, return_exceptions=True)
        if listing.cancelled():
            return None
        return listing.result()

    def _next_wake(self, interval: float) -> float:
        """Seconds until the next round: ``interval``, or sooner when a reader is due to
        restart, or another replica's lease or heartbeat lapses (a crashed replica's
        shards are then taken at once, not up to a round later)."""
        now = time.monotonic()
        pending = [at - now for at in self._restart_at.values() if at > now]
        if self._lapse_at is not None and self._lapse_at > now:
            pending.append(self._lapse_at - now)
        return max(0.01, min([interval, *pending]))

    async def _balance(self) -> None:
        """One balancing round: read the leases of the leasable shards and the live
        replicas, take free leases up to this replica's share and ask the most-loaded
        replica for one more if still below it."""
        if self._stopping.is_set():
            return
        checkpoints = await self._checkpoints.all()
        now = time.monotonic()
        leasable: list[str] = []
        for sid, shard in self._shards.items():
            if self._positions.trusted(sid, checkpoints) == keys.SHARD_END:
                self._shard_ended(sid)
                continue
            if sid in self._ended:
                continue
            if all(self._parent_done(p, checkpoints) for p in shard.parents):
                leasable.append(sid)
        replicas = await self._lease_store.heartbeat(alive=False)  # the keeper heartbeats
        states = await self._lease_store.snapshot(leasable, refresh=True)  # keeps our requests
        for sid in self._lag_series - self._running.keys():
            owner = states[sid].owner if sid in states else None
            if owner not in (None, self.replica_id):  # read elsewhere now
                self._drop_lag(sid)
        lapses = [
            state.expires_in_ms
            for state in states.values()
            if state.owner not in (None, self.replica_id) and state.expires_in_ms is not None
        ]
        lapses += [
            expiry - replicas.now_ms
            for replica, expiry in replicas.expiry_ms.items()
            if replica != self.replica_id
        ]
        self._lapse_at = time.monotonic() + min(lapses) / 1000 + LAPSE_MARGIN if lapses else None
        chosen = plan(
            me=self.replica_id,
            leasable=leasable,
            leases=states,
            live=replicas.expiry_ms,
            mine=self._running,
        )
        for sid, victim in chosen.steal:
            if await self._lease_store.request_steal(sid, victim, self._steal_bound_ms):
                self._metrics.leases_stolen.inc()
                self._log.info("lease_steal_requested", shard_id=sid, owner=victim)
        wanted = len(chosen.take)
        for sid in [*chosen.take, *chosen.spare]:
            if self._stopping.is_set() or wanted <= 0:
                return
            if sid in self._running or self._restart_at.get(sid, 0) > now:
                continue
            lease = await self._leases.acquire(sid)
            if lease is None:
                continue  # another replica was first: the next spare instead
            wanted -= 1
            try:
                await self._take(self._shards[sid], lease)
            except Exception:
                if sid not in self._running:  # failed before its reader started
                    await self._leases.give_back(lease, bounded=True)
                raise

    async def _take(self, shard: ShardInfo, lease: Lease) -> None:
        """Start reading a shard whose lease was just acquired (or give the lease back)."""
        sid = shard.shard_id
        # Another replica may have moved the checkpoint since the snapshot above.
        latest = await self._checkpoints.get(sid)
        fresh = self._positions.trusted(sid, {sid: latest} if latest else {})
        if fresh == keys.SHARD_END:  # read to its end by another replica since the snapshot
            self._shard_ended(sid)
            await self._leases.release(lease)
            return
        self._restart_at.pop(sid, None)
        try:
            await self._start_reader(shard, lease, fresh, latest)
        except LeaseLost as exc:  # taken over between acquiring and starting: not ours
            self._restart_at[sid] = time.monotonic() + MIN_RESTART_DELAY
            self._leases.lost(lease)
            self._log.warning("lease_lost", shard_id=sid, error=str(exc))
        except CheckpointMoved as exc:  # moved since read just above: start again later
            self._restart_at[sid] = time.monotonic() + MIN_RESTART_DELAY
            self._log.warning("checkpoint_moved", shard_id=sid, error=str(exc))
            await self._leases.give_back(lease)

    def _shard_ended(self, shard_id: str) -> None:
        """Note a shard read to its end, here or by another replica: the shards are listed
        again at the next round, as its children may now be read (and may be this
        replica's to take: the one that read the parent may be at its share)."""
        if shard_id not in self._ended:
            self._ended.add(shard_id)
            self._relist = True
        if shard_id not in self._running:
            self._drop_lag(shard_id)

    def _drop_lag(self, shard_id: str) -> None:
        """Remove the shard's lag series: this replica no longer reads it."""
        self._lag_series.discard(shard_id)
        self._metrics.millis_behind.remove(shard_id)
        self._metrics.iterator_age.remove(shard_id)

    def _checkpointed_this_run(self, shard_id: str) -> bool:
        """Whether this run has checkpointed the shard: a handled batch, or its end."""
        progress = self.progress.get(shard_id)
        return progress is not None and bool(progress.batches or progress.ended)

    def _parent_done(self, parent: str, checkpoints: dict[str, str]) -> bool:
        if parent not in self._shards:
            return True  # trimmed: past retention, nothing left to read
        return (
            parent in self._ended or self._positions.trusted(parent, checkpoints) == keys.SHARD_END
        )

    async def _start_reader(
        self, shard: ShardInfo, lease: Lease, checkpoint: str | None, stored: str | None
    ) -> None:
        """Start reading from ``checkpoint`` (the one to trust; None to start afresh);
        ``stored`` is what Redis holds, which the reader's first write must find."""
        sid = shard.shard_id
        start, stored = await self._positions.start(
            shard, lease, checkpoint, stored, listed=self._shards
        )
        progress = self.progress.setdefault(sid, ShardProgress(sid))
        progress.caught_up = False
        settings = self._settings
        reader = self._reader_factory(
            kinesis=self._kinesis,
            stream=self._stream,
            lease=lease,
            start=start,
            stored=stored,
            checkpoints=self._checkpoints,
            processor=self._processor,
            batch_limit=settings.batch_limit,
            idle_interval=settings.idle_interval,
            prefetch=settings.prefetch_batches,
            progress=progress,
        )
        # Renewed from now, before the listeners hear of it: a hook may take up to
        # ``handler_timeout``, longer than the lease lasts unrenewed. A lease lost or asked
        # for meanwhile stops the reader before it reads anything.
        self._leases.keep(
            reader.lease,
            on_lost=reader.stop,
            on_hand_over=reader.stop,
            lag=lambda: progress.millis_behind,
        )
        await self._assigned(sid)
        if self._stopping.is_set():
            reader.stop()  # stop() came during the hook, before this reader was listed
        self._lag_series.add(sid)
        task = asyncio.create_task(reader.run(), name=f"shard-{sid}")
        task.add_done_callback(lambda _: self._wake.set())
        self._running[sid] = _Running(reader, task)
        self._log.info(
            "shard_started",
            shard_id=sid,
            start=start.iterator_type,
            sequence=start.sequence,
            timestamp=start.timestamp.isoformat() if start.timestamp else None,
            owner=lease.owner,
            lease_token=lease.token,
        )

    async def _reap(self) -> None:
        """Collect finished readers: ended shards, lost leases, failures (restart later).
        The listeners then hear of them all at once (their hooks run concurrently)."""
        revoked: dict[str, bool] = {}
        for sid, running in list(self._running.items()):
            if not running.task.done():
                continue
            del self._running[sid]
            # Never start a shard again at once: keeps GetShardIterator under its limit.
            self._restart_at[sid] = time.monotonic() + MIN_RESTART_DELAY
            failure: BaseException | None = None
            ended = False
            if running.task.cancelled():
                if not self._stopping.is_set():
                    failure = RuntimeError("the shard reader was cancelled")
            else:
                failure = running.task.exception()
                ended = failure is None and running.task.result()
            if isinstance(failure, LeaseLost):
                self._log.warning("lease_lost", shard_id=sid, error=str(failure))
                self._leases.lost(running.reader.lease)  # not ours: stop renewing it
                self._drop_lag(sid)
                revoked[sid] = False
                continue
            if failure is not None:
                failures = self._failures.get(sid, 0) + 1
                self._failures[sid] = failures
                delay = max(MIN_RESTART_DELAY, self._backoff.delay(failures))
                self._restart_at[sid] = time.monotonic() + delay
                self._log.error(
                    "shard_reader_failed",
                    shard_id=sid,
                    failures=failures,
                    restart_in=round(delay, 2),
                    retriable=is_retriable(failure) or is_infrastructure_failure(failure),
                    error=f"{type(failure).__name__}: {failure}",
                )
            else:
                # Stopped (handed over, or its lease was lost) or ended: no longer read here.
                # A failed reader restarts here unless another replica takes the shard first
                # (its series goes then, in ``_balance``).
                self._failures.pop(sid, None)
                self._drop_lag(sid)
                if ended:
                    self._shard_ended(sid)
            await self._leases.give_back(running.reader.lease)
            revoked[sid] = ended
        if revoked:
            await self._revoked(revoked)

    async def all_caught_up(self) -> bool:
        """True when every shard still in the stream is ended, or at its tip: read by us,
        or by another replica of the group (which marks its shards' tips in Redis)."""
        now = time.monotonic()
        if any(at > now for at in self._restart_at.values()):
            return False
        pending = [sid for sid in self._shards if sid not in self._ended]
        ours = {
            sid
            for sid in pending
            if sid in self._running and self._running[sid].reader.progress.caught_up
        }
        others = [sid for sid in pending if sid not in self._running]
        at_tip = await self._checkpoints.at_tip(others)
        return bool(self._shards) and len(ours) + len(at_tip) == len(pending)

    async def _shutdown(self) -> None:
        """Let readers finish their batch, then release their leases, all within
        ``shutdown_timeout`` of the stop request (releases get at least a second). A reader
        still running then is cancelled; one that ignores it for ``ABANDON_GRACE`` is
        abandoned (``self.abandoned``): its lease is released all the same, so its late
        checkpoint is refused and the shard is read again elsewhere from the last one."""
        began = self._stop_requested if self._stop_requested is not None else time.monotonic()
        deadline = began + self._settings.shutdown_timeout
        # Leave the live set first. This replica's steal requests are void at once: a shard
        # released for it is free for the others, not reserved for a replica that will never
        # take it. The others aim for their share without it, but ask only live replicas
        # for shards: its own leases stay renewed (renewals do not depend on the heartbeat)
        # and are released below, each after its reader's last checkpoint.
        try:
            await asyncio.wait_for(self._leases.leave(), 1.0)
        except Exception as exc:  # the heartbeat expires by itself anyway
            self._log.warning("replica_leave_failed", error=f"{type(exc).__name__}: {exc}")
        running = list(self._running.values())
        for item in running:
            item.reader.stop()
        if running:
            _done, pending = await asyncio.wait(
                [item.task for item in running], timeout=max(0.0, deadline - time.monotonic())
            )
            for task in pending:
                task.cancel()
            if pending:
                self._log.warning("shutdown_timeout", abandoned=len(pending))
                _done, pending = await asyncio.wait(pending, timeout=ABANDON_GRACE)
            for item in running:
                if item.task in pending:
                    self.abandoned.append(item.reader.shard_id)
                    item.task.add_done_callback(self._abandoned_ended)
            if self.abandoned:
                self._log.error(
                    "shard_reader_abandoned",
                    shards=self.abandoned,
                    hint="a handler ignored its cancellation; its batch is read again "
                    "after the next start",
                )
        for item in running:
            task = item.task
            if task.done() and not task.cancelled() and task.exception() is not None:
                self._log.error(
                    "shard_reader_failed",
                    shard_id=item.reader.shard_id,
                    error=repr(task.exception()),
                )
        self._running.clear()
        await self._leases.give_back_all([item.reader.lease for item in running], deadline=deadline)
        for item in running:
            self._drop_lag(item.reader.shard_id)
        # The hooks get what is left of the budget, at least a second, at most their timeout.
        hook_time = min(self._settings.handler_timeout, max(1.0, deadline - time.monotonic()))
        await self._revoked(
            {item.reader.shard_id: item.reader.progress.ended for item in running},
            limit=hook_time,
        )

    def _abandoned_ended(self, task: asyncio.Task[bool]) -> None:
        """An abandoned reader ended after all (its outcome is logged, not lost)."""
        error = None if task.cancelled() else task.exception()
        self._log.warning(
            "abandoned_reader_ended",
            task=task.get_name(),
            error=None if error is None else f"{type(error).__name__}: {error}",
        )

    async def _assigned(self, shard_id: str) -> None:
        await asyncio.gather(
            *(
                self._tell(listener, [shard_id], listener.on_shards_assigned([shard_id]))
                for listener in self._listeners
            )
        )

    async def _revoked(self, shards: Mapping[str, bool], *, limit: float | None = None) -> None:
        """Tell the listeners that ``shards`` (shard id → whether it ended) are no longer
        read here: one call per listener and value of ``ended``, the listeners at once."""
        calls = []
        for ended in (False, True):
            group = [sid for sid, done in shards.items() if done is ended]
            if group:
                calls += [
                    self._tell(
                        listener, group, listener.on_shards_revoked(group, ended=ended), limit
                    )
                    for listener in self._listeners
                ]
        await asyncio.gather(*calls)

    async def _tell(
        self,
        listener: ShardListener,
        shards: Iterable[str],
        call: Awaitable[None],
        limit: float | None = None,
    ) -> None:
        """Await one ``ShardListener`` hook call, for at most ``limit`` seconds (by default
        ``handler_timeout``, cut to what is left of the shutdown budget once a stop is asked
        for: a stop never waits out a hook's whole timeout); a failure or a timeout is
        logged, never raised (reading goes on). A timed-out call is cancelled (counted in
        ``supersim_handler_timeouts_total``); if it ignores that for ``ABANDON_GRACE`` it is
        left to end on its own."""
        name = getattr(listener, "name", type(listener).__name__)
        began = time.monotonic()
        hook: asyncio.Future[None] = asyncio.ensure_future(call)
        try:
            if limit is None:
                limit = self._settings.handler_timeout
                await self._until_done_or_stopped(hook, limit)
                if not hook.done() and self._stop_requested is not None:
                    budget = self._stop_requested + self._settings.shutdown_timeout
                    limit = min(limit, budget - began)
                    await asyncio.wait({hook}, timeout=max(0.0, began + limit - time.monotonic()))
            else:
                await asyncio.wait({hook}, timeout=limit)
        except asyncio.CancelledError:
            hook.cancel()
            self._keep_stray(hook)
            raise
        if not hook.done():
            hook.cancel()
            await asyncio.wait({hook}, timeout=ABANDON_GRACE)
            self._metrics.handler_timeouts.labels(handler=name).inc()
            self._log.warning(
                "shard_listener_timeout",
                shards=list(shards),
                handler=name,
                seconds=round(max(0.0, limit), 2),
                abandoned=not hook.done(),
            )
            self._keep_stray(hook)
            return
        if hook.cancelled():
            error: str | None = "CancelledError: the hook raised it"
        else:
            raised = hook.exception()
            error = None if raised is None else f"{type(raised).__name__}: {raised}"
        if error is not None:
            self._log.warning(
                "shard_listener_failed", shards=list(shards), handler=name, error=error
            )

    async def _until_done_or_stopped(self, hook: asyncio.Future[None], limit: float) -> None:
        """Wait ``limit`` seconds at most for ``hook``, less if a stop is asked for."""
        stopped: asyncio.Future[Any] = asyncio.ensure_future(self._stopping.wait())
        waiting: set[asyncio.Future[Any]] = {hook, stopped}
        try:
            await asyncio.wait(waiting, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            await asyncio.gather(stopped, return_exceptions=True)

    def _keep_stray(self, hook: asyncio.Future[None]) -> None:
        """Keep a hook call that has not ended yet until it does, then collect its outcome
        (so nothing is left unretrieved)."""
        if hook.done():
            if not hook.cancelled():
                hook.exception()
            return
        self._strays.add(hook)

        def collect(ended: asyncio.Future[None]) -> None:
            self._strays.discard(ended)
            if not ended.cancelled():
                ended.exception()

        hook.add_done_callback(collect)


def _worth_retrying(exc: BaseException) -> bool:
    """Whether a failed discovery round (ListShards, lease and checkpoint reads) is retried.
    Kinesis configuration errors (no credentials or region, an unknown stream, access
    denied) end the run with their message; outages of Kinesis, Redis or the network wait."""
    if isinstance(exc, BotoCoreError | ClientError):
        return is_retriable(exc)
    return is_infrastructure_failure(exc)
