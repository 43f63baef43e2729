"""Lease balancing in the small: the plan of one round (a pure function), the steal
request scripts on a real redis-server, and the lease keeper's own clock. The whole
mechanism, with real replica processes, is in ``test_scale_out.py``."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker import keys
from worker.consumer.balance import plan
from worker.consumer.lease_keeper import LeaseKeeper
from worker.consumer.leases import LeaseManager, LeaseState, Renewal

SHARDS = [f"s{i}" for i in range(8)]
PREFIX = keys.prefix("stream", "group")


def lease(shard: str, owner: str | None, thief: str | None = None) -> LeaseState:
    return LeaseState(shard, owner, "1" if owner else None, 8000 if owner else None, thief)


def test_a_shard_handed_over_is_taken_though_its_request_already_counted() -> None:
    """A shard released for this replica's steal request is taken, even though the request
    already brought it to its share (it would otherwise wait out the request's bound)."""
    leases = {
        **{sid: lease(sid, "a") for sid in SHARDS[:4]},
        "s4": lease("s4", None, thief="b"),
        **{sid: lease(sid, "b") for sid in SHARDS[5:]},
    }
    mine = set(SHARDS[5:])
    chosen = plan(me="b", leasable=SHARDS, leases=leases, live={"a", "b"}, mine=mine)
    assert chosen.target == 4
    assert chosen.take == ["s4"]
    assert chosen.steal == []


def test_a_steal_request_by_a_replica_gone_reserves_nothing() -> None:
    """A free shard reserved by a replica no longer live is taken like any free one."""
    leases = {sid: lease(sid, "a") for sid in SHARDS[:4]}
    leases["s4"] = lease("s4", None, thief="gone")
    chosen = plan(me="b", leasable=SHARDS[:5], leases=leases, live={"a", "b"}, mine=set())
    assert chosen.take == ["s4"]


def test_standing_requests_count_against_the_victims_load() -> None:
    """Once one shard is asked of a replica above its share, the next request goes to the
    other one above it, not again to the first (which would end below its share)."""
    leases = {
        **{sid: lease(sid, "a") for sid in SHARDS[:3]},
        "s3": lease("s3", "a", thief="me"),
        **{sid: lease(sid, "c") for sid in SHARDS[4:]},
    }
    chosen = plan(me="me", leasable=SHARDS, leases=leases, live={"a", "c", "me"}, mine=set())
    assert chosen.target == 3
    assert [victim for _, victim in chosen.steal] == ["c"]


def test_free_shards_beyond_the_share_are_spares() -> None:
    """A replica takes free shards up to its share and keeps the rest, in order, as spares
    for those another replica takes first (survivors of a crash race for its shards)."""
    leases = {sid: lease(sid, "a") for sid in SHARDS[:2]}
    leases.update({sid: lease(sid, "b") for sid in SHARDS[2:5]})
    chosen = plan(me="b", leasable=SHARDS, leases=leases, live={"a", "b"}, mine=set(SHARDS[2:5]))
    assert chosen.target == 4
    assert chosen.take == ["s5"]
    assert chosen.spare == ["s6", "s7"]


def test_seven_shards_over_three_replicas_end_3_2_2() -> None:
    """A replica one short of the share does not steal from one at it (3/2/2, not 3/3/1)."""
    leases = {
        **{sid: lease(sid, "a") for sid in SHARDS[:3]},
        **{sid: lease(sid, "b") for sid in SHARDS[3:5]},
        **{sid: lease(sid, "c") for sid in SHARDS[5:7]},
    }
    chosen = plan(
        me="c", leasable=SHARDS[:7], leases=leases, live={"a", "b", "c"}, mine={"s5", "s6"}
    )
    assert (chosen.take, chosen.steal) == ([], [])


async def heartbeat(redis: Redis, replica: str) -> LeaseManager:
    manager = LeaseManager(redis, PREFIX, replica, ttl_seconds=5)
    await manager.heartbeat()
    return manager


async def test_only_a_live_thief_may_take_the_lease_it_asked_for(redis: Redis) -> None:
    """Released after a steal request, the lease is reserved for the thief while it lives;
    once it has left the live set, any replica may take it."""
    owner, thief, other = [await heartbeat(redis, name) for name in ("a", "t", "b")]
    held = await owner.acquire("s")
    assert held is not None
    assert await thief.request_steal("s", "a", bound_ms=60_000)
    assert await owner.renew(held) is Renewal.HAND_OVER
    assert await owner.release(held)
    assert await other.acquire("s") is None, "reserved for the thief"
    await thief.leave()
    taken = await other.acquire("s")
    assert taken is not None
    assert int(taken.token) > int(held.token)
    assert await redis.exists(keys.steal(PREFIX, "s")) == 0


async def test_a_request_by_a_thief_gone_no_longer_asks_the_owner(redis: Redis) -> None:
    """The owner stops being asked to hand over once the thief has left: its renewals
    keep the lease, and the request is removed."""
    owner, thief = [await heartbeat(redis, name) for name in ("a", "t")]
    held = await owner.acquire("s")
    assert held is not None
    assert await thief.request_steal("s", "a", bound_ms=60_000)
    assert await owner.renew(held) is Renewal.HAND_OVER
    await thief.leave()
    assert await owner.renew(held) is Renewal.KEPT
    assert await redis.exists(keys.steal(PREFIX, "s")) == 0


async def test_a_lease_unconfirmed_for_its_ttl_stops_its_reader(redis: Redis) -> None:
    """A kept lease with no renewal for a whole TTL (here the renewals never come) has its
    reader stopped on this process's clock, and the stop is logged."""
    manager = LeaseManager(redis, PREFIX, "a", ttl_seconds=0.3)
    stopped = asyncio.Event()
    async with LeaseKeeper(manager, renew_interval=60) as keeper:
        held = await keeper.acquire("s")
        assert held is not None
        with capture_logs() as logs:
            keeper.keep(held, on_lost=stopped.set, on_hand_over=stopped.set)
            await asyncio.wait_for(stopped.wait(), 5)
    assert [entry["event"] for entry in logs] == ["lease_unconfirmed"]


async def test_renewed_leases_keep_their_reader(redis: Redis) -> None:
    """Leases renewed in time never stop their reader, however long they are kept."""
    manager = LeaseManager(redis, PREFIX, "a", ttl_seconds=0.4)
    stopped = asyncio.Event()
    async with LeaseKeeper(manager, renew_interval=0.1) as keeper:
        held = await keeper.acquire("s")
        assert held is not None
        keeper.keep(held, on_lost=stopped.set, on_hand_over=stopped.set)
        await asyncio.sleep(1.5)
    assert not stopped.is_set()


async def test_the_keeper_heartbeats_until_the_replica_leaves(redis: Redis) -> None:
    """The lease keeper announces its replica as soon as it starts and with every renewal
    round, with no balancing round involved; once it leaves, no heartbeat brings it back."""
    manager = LeaseManager(redis, PREFIX, "a", ttl_seconds=1.0)
    watcher = LeaseManager(redis, PREFIX, "w", ttl_seconds=1.0)

    async def live() -> set[str]:
        return set((await watcher.heartbeat(alive=False)).expiry_ms)

    async with LeaseKeeper(manager, renew_interval=0.1) as keeper:
        for _ in range(30):  # three TTLs: kept alive by the renewal rounds alone
            await asyncio.sleep(0.1)
            assert await live() == {"a"}
        await keeper.leave()
        for _ in range(5):
            await asyncio.sleep(0.1)
            assert await live() == set()
