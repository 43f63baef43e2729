"""Keeping this worker's shard leases: taking, renewing and giving them back.

The supervisor takes a shard's lease here, hands it to ``keep`` once the shard's reader
runs, and gives it back here when the reader is done. While kept, the lease is renewed
every ``renew_interval`` (the supervisor uses a quarter of the lease TTL), all leases at
once, by one background task, owned by the ``LeaseKeeper`` context (started on entry,
cancelled and awaited on exit); each renewal also records the shard's lag for
``status``. A lease found lost (expired and taken by another replica, or a steal request
left unanswered) is logged and reported through its ``on_lost`` callback, which stops the
shard's reader; the lease stays kept, and is reported again each round, until the
supervisor forgets it or gives it back (when the reader has ended). A lease another
replica asked for is reported through ``on_hand_over`` (the reader finishes its batch,
checkpoints and stops; the lease is then given back and the thief takes it). A renewal
that fails (Redis unreachable) is logged and tried again next round, until the lease's
TTL is up (below).

A lease is also watched on this process's clock: one not confirmed by a renewal for a whole
TTL may have expired in Redis and been taken, so its reader is stopped (through
``on_lost``) the moment that TTL is up, by a timer rather than by the renewal task. After
a pause of the process (SIGSTOP, a VM frozen, a starved event loop) those timers fire
before any task resumes, so no reader starts another batch on a lease it cannot vouch for:
only the batch in flight finishes, and its checkpoint write is refused by the fence.

The same task heartbeats this replica into the group's live set (``LeaseManager.heartbeat``)
at the start of every round, before the renewals: the heartbeat depends on Redis alone,
never on Kinesis (a failing ListShards must not make the peers take this replica for dead).
``leave`` takes the replica out of the live set for good (a graceful stop); no heartbeat
puts it back.

Releases never stop the worker: the lease expires by itself anyway. On failure paths
and at shutdown they are bounded in time.

Metrics: ``supersim_leases_held`` (leases kept), ``supersim_leases_taken_total``,
``supersim_leases_lost_total`` (once per tenure: found taken by a renewal, or by the
fence refusing a checkpoint, ``lost``) and ``supersim_leases_handed_over_total`` (given
back after another replica asked for it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from worker.consumer.leases import Lease, LeaseManager, Renewal
from worker.metrics import Metrics
from worker.owned_task import OwnedTask

RELEASE_TIMEOUT = 2.0
"""Seconds a lease release may take on a failure path before the lease is left to expire."""


@dataclass(slots=True)
class _Kept:
    lease: Lease
    on_lost: Callable[[], None]
    on_hand_over: Callable[[], None]
    lag: Callable[[], int | None]
    expiry: asyncio.TimerHandle | None = None
    """Stops the reader when the lease's TTL is up on this clock without a confirmation."""
    asked: bool = False
    """Another replica asked for it: given back, it counts as handed over."""
    lost: bool = False
    """Found lost (counted once)."""


class LeaseKeeper(OwnedTask):
    """Takes, renews and gives back the leases of one worker (see the module docstring)."""

    name = "lease-renewer"

    def __init__(
        self, leases: LeaseManager, *, renew_interval: float, metrics: Metrics | None = None
    ) -> None:
        super().__init__()
        self._leases = leases
        self._metrics = metrics or Metrics()
        self._beat = asyncio.Lock()
        """Held by a heartbeat call and by ``leave``: no heartbeat lands after the leave."""
        self._left = False
        self._interval = renew_interval
        self._ttl = leases.ttl_ms / 1000
        self._kept: dict[str, _Kept] = {}
        self._taken: dict[str, float] = {}
        """When each lease was asked for (monotonic), until ``keep`` arms its expiry."""
        self._log = structlog.get_logger("worker.consumer.lease_keeper")

    async def acquire(self, shard_id: str) -> Lease | None:
        """Take the shard's lease, or None if another owner holds it. Not renewed until
        ``keep``: a lease the caller fails to use is given back (or expires)."""
        asked = time.monotonic()
        lease = await self._leases.acquire(shard_id)
        if lease is not None:
            self._taken[shard_id] = asked
            self._metrics.leases_taken.inc()
        return lease

    def keep(
        self,
        lease: Lease,
        *,
        on_lost: Callable[[], None],
        on_hand_over: Callable[[], None],
        lag: Callable[[], int | None] = lambda: None,
    ) -> None:
        """Renew ``lease`` from now until it is given back; call ``on_lost`` whenever a
        renewal finds it lost, ``on_hand_over`` whenever another replica asks for it;
        ``lag`` gives the shard's last MillisBehindLatest to record."""
        self._disarm(self._kept.get(lease.shard_id))
        kept = _Kept(lease, on_lost, on_hand_over, lag)
        self._kept[lease.shard_id] = kept
        self._metrics.leases_held.set(len(self._kept))
        self._confirmed(kept, self._taken.pop(lease.shard_id, time.monotonic()))

    @property
    def held(self) -> int:
        return len(self._kept)

    async def release(self, lease: Lease) -> None:
        """Give a lease back, raising if Redis fails (the caller's round then fails)."""
        asked = self._asked(lease)
        self.forget(lease)
        if await self._leases.release(lease) and asked:
            self._metrics.leases_handed_over.inc()

    async def give_back(self, lease: Lease, *, bounded: bool = False) -> None:
        """Give a lease back, logging a failure; ``bounded`` waits at most
        ``RELEASE_TIMEOUT`` (a failure path, possibly during shutdown). The lease expires
        by itself anyway: never stop for this."""
        asked = self._asked(lease)
        self.forget(lease)
        await self._release_logged(lease, asked, RELEASE_TIMEOUT if bounded else None)

    async def give_back_all(self, leases: Sequence[Lease], *, deadline: float) -> None:
        """Give ``leases`` back at shutdown: concurrently, and by ``deadline`` (a
        ``time.monotonic()`` time) but given at least a second. Against an unreachable Redis
        each release would wait out the client's timeouts, and the leases expire by
        themselves anyway."""
        if not leases:
            return
        asked = {lease.shard_id for lease in leases if self._asked(lease)}
        for lease in leases:
            self.forget(lease)  # at once: none is renewed while the releases wait their turn
        releases = [self._release_logged(lease, lease.shard_id in asked) for lease in leases]
        try:
            await asyncio.wait_for(
                asyncio.gather(*releases), timeout=max(1.0, deadline - time.monotonic())
            )
        except TimeoutError:
            self._log.warning("lease_release_timeout", leases=len(leases))

    async def _release_logged(self, lease: Lease, asked: bool, limit: float | None = None) -> None:
        """Release a lease no longer kept, within ``limit`` seconds if given, logging a
        failure; one another replica ``asked`` for counts as handed over."""
        try:
            if await asyncio.wait_for(self._leases.release(lease), limit) and asked:
                self._metrics.leases_handed_over.inc()
        except Exception as exc:
            self._log.warning(
                "lease_release_failed",
                shard_id=lease.shard_id,
                error=f"{type(exc).__name__}: {exc}",
            )

    def forget(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (if it is the one kept for its shard), without giving
        it back: for a lease given back right after (or found lost: ``lost``)."""
        self._taken.pop(lease.shard_id, None)
        kept = self._kept.get(lease.shard_id)
        if kept is not None and kept.lease == lease:
            self._disarm(kept)
            del self._kept[lease.shard_id]
            self._metrics.leases_held.set(len(self._kept))

    def lost(self, lease: Lease) -> None:
        """Stop renewing ``lease``, found lost by its reader (the fence refused its
        checkpoint); counted unless a renewal found it lost already."""
        kept = self._kept.get(lease.shard_id)
        if kept is None or kept.lease != lease or not kept.lost:
            self._metrics.leases_lost.inc()
        self.forget(lease)

    async def leave(self) -> None:
        """Take this replica out of the live set for good (a graceful stop): no heartbeat
        comes after it, not even one in flight."""
        self._left = True
        async with self._beat:
            await self._leases.leave()

    def _asked(self, lease: Lease) -> bool:
        kept = self._kept.get(lease.shard_id)
        return kept is not None and kept.lease == lease and kept.asked

    def _confirmed(self, kept: _Kept, at: float) -> None:
        """The lease was ours at ``at`` (monotonic, when the call confirming it was sent):
        it cannot expire in Redis before ``at`` + TTL, so its reader may read until then."""
        self._disarm(kept)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (at + self._ttl - time.monotonic())
        kept.expiry = loop.call_at(deadline, self._expired, kept, at)

    def _expired(self, kept: _Kept, confirmed: float) -> None:
        kept.expiry = None
        if self._kept.get(kept.lease.shard_id) is not kept:
            return
        self._log.warning(
            "lease_unconfirmed",
            shard_id=kept.lease.shard_id,
            seconds=round(time.monotonic() - confirmed, 1),
        )
        kept.on_lost()

    @staticmethod
    def _disarm(kept: _Kept | None) -> None:
        if kept is not None and kept.expiry is not None:
            kept.expiry.cancel()
            kept.expiry = None

    async def _finish(self) -> None:
        for kept in self._kept.values():
            self._disarm(kept)

    async def _heartbeat(self) -> None:
        """Announce this replica as live for a TTL, unless it has left; a failure is
        logged (the next round tries again, a quarter TTL later)."""
        async with self._beat:
            if self._left:
                return
            try:
                await self._leases.heartbeat()
            except Exception as exc:
                self._log.warning("replica_heartbeat_failed", error=f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        while True:
            await self._heartbeat()
            await asyncio.sleep(self._interval)
            # Every lease at once: a round then takes the event-loop turns of one round trip
            # whatever the number of leases. On a busy loop (shards decoding big batches on a
            # loaded machine) a turn can take a good part of a second, and renewing one
            # lease after the other took long enough for the last ones to go unconfirmed.
            async with asyncio.TaskGroup() as renewals:
                for sid, kept in list(self._kept.items()):
                    renewals.create_task(self._renew(sid, kept), name=f"renew-{sid}")

    async def _renew(self, sid: str, kept: _Kept) -> None:
        if self._kept.get(sid) is not kept:
            return  # given back (or kept anew) since the round began
        asked = time.monotonic()
        try:
            renewal = await self._leases.renew(kept.lease, kept.lag())
        except Exception as exc:
            self._log.warning("lease_renew_failed", shard_id=sid, error=str(exc))
            return
        if self._kept.get(sid) is not kept:
            return  # given back during the call: what it found is not news
        if renewal is Renewal.LOST:
            self._log.warning("lease_lost", shard_id=sid)
            self._disarm(kept)
            if not kept.lost:
                kept.lost = True
                self._metrics.leases_lost.inc()
            kept.on_lost()
            return
        self._confirmed(kept, asked)
        if renewal is Renewal.HAND_OVER:
            if not kept.asked:
                kept.asked = True
                self._log.info("lease_handing_over", shard_id=sid)
            kept.on_hand_over()
