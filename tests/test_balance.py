"""Lease balancing in the small: the plan of one round (a pure function), the steal
request scripts on a real redis-server, and the lease keeper's own clock. The whole
mechanism, with real replica processes, is in ``test_scale_out.py``."""

from __future__ import annotations

import asyncio

from prometheus_client import generate_latest
from redis.asyncio import Redis
from structlog.testing import capture_logs
from test_observability import samples

from worker import keys
from worker.consumer.balance import plan
from worker.consumer.lease_keeper import LeaseKeeper
from worker.consumer.leases import Lease, LeaseManager, LeaseState, Renewal
from worker.metrics import Metrics

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


async def test_a_thief_whose_rounds_stopped_holds_no_shard_back(redis: Redis) -> None:
    """A thief that still heartbeats but no longer runs its balancing rounds (ListShards
    failing, a hung listener hook) reserves nothing: once its crashed owner's lease has
    expired, the shard waits for the thief while its rounds refresh the request, and is
    free to any replica a lease TTL after the last one."""
    owner, thief, other = [LeaseManager(redis, PREFIX, name, ttl_seconds=1.0) for name in "atb"]
    for manager in (owner, thief, other):
        await manager.heartbeat()
    assert await owner.acquire("s") is not None
    assert await thief.request_steal("s", "a", bound_ms=60_000)
    for _ in range(4):  # the owner crashed: its lease expires meanwhile
        await asyncio.sleep(0.3)
        await thief.heartbeat()
        assert (await thief.snapshot(["s"], refresh=True))["s"].thief == "t"
    assert (await other.snapshot(["s"]))["s"].owner is None
    assert await other.acquire("s") is None, "reserved while the thief's rounds run"
    for _ in range(4):  # the thief heartbeats, but its rounds no longer run
        await asyncio.sleep(0.3)
        await thief.heartbeat()
    assert "t" in (await other.heartbeat(alive=False)).expiry_ms
    assert (await other.snapshot(["s"]))["s"].thief is None, "void: not refreshed"
    assert await other.acquire("s") is not None


async def test_an_owner_keeps_a_shard_asked_for_by_a_thief_whose_rounds_stopped(
    redis: Redis,
) -> None:
    """The owner is asked to hand a shard over only while the thief's rounds refresh the
    request: once they stop (the thief still heartbeating), its renewals keep the lease
    and the request is removed."""
    owner, thief = [LeaseManager(redis, PREFIX, name, ttl_seconds=1.0) for name in "at"]
    await thief.heartbeat()
    held = await owner.acquire("s")
    assert held is not None
    assert await thief.request_steal("s", "a", bound_ms=60_000)
    found = []
    for _ in range(6):
        found.append(await owner.renew(held))
        await asyncio.sleep(0.3)
        await thief.heartbeat()
    assert found[0] is Renewal.HAND_OVER
    assert found[-1] is Renewal.KEPT
    assert await redis.exists(keys.steal(PREFIX, "s")) == 0


async def test_a_lease_released_for_its_thief_waits_for_it_a_ttl_at_most(redis: Redis) -> None:
    """Released for a steal request, the lease is reserved for a lease TTL at most: a
    thief that runs its rounds but does not claim it by then loses it to any replica."""
    owner, thief, other = [LeaseManager(redis, PREFIX, name, ttl_seconds=1.0) for name in "atb"]
    await thief.heartbeat()
    held = await owner.acquire("s")
    assert held is not None
    assert await thief.request_steal("s", "a", bound_ms=60_000)
    assert await owner.renew(held) is Renewal.HAND_OVER
    assert await owner.release(held)
    assert 0 < await redis.pttl(keys.steal(PREFIX, "s")) <= 1000
    assert await other.acquire("s") is None
    for _ in range(4):
        await asyncio.sleep(0.3)
        await thief.heartbeat()
        await thief.snapshot(["s"], refresh=True)
    assert await other.acquire("s") is not None


async def test_a_steal_request_stands_for_the_owners_bound_when_longer(redis: Redis) -> None:
    """The owner stores its steal bound with the lease: a thief with a shorter one (other
    settings or handlers, during a rolling change) cannot have the owner's renewals
    refused before the owner's own bound is up. With both short, they are refused, and the
    request then lasts two TTLs at most."""
    owner, thief = [LeaseManager(redis, PREFIX, name, ttl_seconds=5.0) for name in "at"]
    await thief.heartbeat()
    owner.steal_bound_ms = 60_000
    held = await owner.acquire("s")
    assert held is not None
    assert await thief.request_steal("s", "a", bound_ms=100)
    await asyncio.sleep(0.3)
    assert await owner.renew(held) is Renewal.HAND_OVER
    owner.steal_bound_ms = 100
    held = await owner.acquire("r")
    assert held is not None
    assert await thief.request_steal("r", "a", bound_ms=100)
    await asyncio.sleep(0.3)
    assert await owner.renew(held) is Renewal.LOST
    assert 0 < await redis.pttl(keys.steal(PREFIX, "r")) <= 10_000


class HeldRenewals(LeaseManager):
    """Real renewals; the test holds up the first shard's until it lets it go (Redis
    latency, many shards)."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis, PREFIX, "a", ttl_seconds=5)
        self.entered = asyncio.Event()
        self.proceed = asyncio.Event()

    async def renew(self, lease: Lease, millis_behind: int | None = None) -> Renewal:
        if lease.shard_id == "s0":
            self.entered.set()
            await self.proceed.wait()
        return await super().renew(lease, millis_behind)


async def test_a_lease_given_back_during_a_renewal_round_is_not_reported_lost(
    redis: Redis,
) -> None:
    """A lease given back while the keeper's renewal round awaits another lease's renewal
    is not renewed afterwards by that round: no ``lease_lost``, no lost count, no
    ``on_lost`` of the reader that gave it back."""
    manager = HeldRenewals(redis)
    metrics = Metrics()
    lost: list[str] = []
    with capture_logs() as logs:
        async with LeaseKeeper(manager, renew_interval=0.05, metrics=metrics) as keeper:
            held = {}
            for sid in ("s0", "s1"):
                taken = await keeper.acquire(sid)
                assert taken is not None
                held[sid] = taken
                keeper.keep(taken, on_lost=lambda sid=sid: lost.append(sid), on_hand_over=print)
            await asyncio.wait_for(manager.entered.wait(), 5)
            await keeper.give_back(held["s1"])  # its reader stopped after its checkpoint
            manager.proceed.set()
            await asyncio.sleep(0.3)  # more rounds
    assert lost == []
    assert not [entry for entry in logs if entry["event"] == "lease_lost"]
    found = samples(generate_latest(metrics.registry).decode())
    assert sum(v for _, v in found.get("supersim_leases_lost_total", [])) == 0
