"""Leases moving between real replica processes (kinesalite, one redis-server), where
timing matters: a steal request never takes a shard from an owner still handling a slow
batch, a replica whose ListShards fails stays in the live set (its heartbeat is the lease
keeper's, not the balancing round's) and still takes the shard it asked for, and the lease
and lag metrics each replica serves follow its shards as they move or end."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import servers
from fault_proxy import FaultProxy
from kinesis_support import events, kinesis_client, put, wait_active
from replica_support import Group, Trickle, duplicates
from test_observability import get, samples, until

pytestmark = pytest.mark.timeout(240)

TTL = 4
SHUTDOWN = 2
OLD_BOUND = 2 * TTL + SHUTDOWN
"""The steal bound before it covered a batch: two TTLs and the shutdown timeout."""
SETTLE = 60.0
FAILOVER = 10.0
"""Seconds from a kill until its shards are held again (crash failover, at a 4 s TTL)."""

Scrape = dict[str, list[tuple[dict[str, str], float]]]


@pytest_asyncio.fixture
async def group(
    redis_server: servers.RedisServer,
    kinesalite_server: servers.KinesaliteServer,
    tmp_path: Path,
) -> AsyncIterator[Group]:
    redis_server.flush()
    kinesalite_server.reset()
    made = Group(
        kinesalite_server.url,
        redis_server.url,
        tmp_path / "logs",
        env={
            "SUPERSIM_LEASE_TTL": str(TTL),
            "SUPERSIM_SHUTDOWN_TIMEOUT": str(SHUTDOWN),
            "SUPERSIM_HANDLERS": "holding:create",
            "HOLDING_DIR": str(tmp_path),
        },
    )
    try:
        yield made
    finally:
        await made.close()


async def scrape(port: int) -> Scrape:
    status, text = await get(port, "/metrics")
    assert status == 200, f"/metrics answered {status}"
    return samples(text)


def value(found: Scrape, name: str) -> float:
    return sum(v for _, v in found.get(name, []))


def lag_shards(found: Scrape) -> set[str]:
    return {labels["shard"] for labels, _ in found.get("supersim_shard_millis_behind_latest", [])}


async def test_a_steal_waits_for_the_owners_slow_batch_and_the_metrics_follow(
    group: Group, tmp_path: Path
) -> None:
    """A replica asked for a shard while its handler takes longer than the old steal bound
    (two TTLs and the shutdown timeout) over a batch, within the handler timeout, keeps the
    lease until the batch is done, then hands it over: no record is handled twice, no
    lease is lost. The owner's /metrics count the hand-over and drop the shard's lag
    series; the thief's count its steal request and the lease taken."""
    await group.create(2)  # the default handler timeout (60 s): the held batch stays within it
    ports = servers.free_ports(2)
    owner = group.start(SUPERSIM_HTTP_PORT=str(ports[0]))
    await group.wait_balanced([2], SETTLE)
    async with Trickle(group) as trickle:
        await trickle.wait_resumed(group.open_shards, time.monotonic(), within=SETTLE)
        hold = tmp_path / str(owner.pid)
        hold.touch()

        async def both_held() -> bool:
            return all((tmp_path / f"{owner.pid}.{sid}.held").exists() for sid in group.shards)

        await group.wait_for(both_held, 30, "both shards' batches held")
        thief = group.start(SUPERSIM_HTTP_PORT=str(ports[1]))

        async def asked() -> str | None:
            leases = await group.leases()
            return next((s for s, state in leases.items() if thief.owns(state.thief)), None)

        shard = await until(asked, SETTLE, "the new replica asked for a shard")
        asked_at = time.monotonic()
        release_at = asked_at + OLD_BOUND + TTL + 3
        while time.monotonic() < release_at:  # the owner keeps the lease while it works
            leases = await group.leases()
            assert owner.owns(leases[shard].owner), f"{shard} taken mid-batch: {leases[shard]}"
            await asyncio.sleep(0.2)
        hold.unlink()
        await group.wait_balanced([1, 1], SETTLE)
        await trickle.wait_resumed(group.open_shards, time.monotonic(), within=SETTLE)
        trickled = await trickle.wait_all_handled(SETTLE)
    handled = await group.handled()
    assert trickled <= {sid for _, _, sid in handled}
    assert not duplicates(handled), f"handled twice: {duplicates(handled)}"
    assert not owner.events("lease_lost"), "the owner's lease was never refused or taken"
    assert [e["shard_id"] for e in owner.events("lease_handing_over")] == [shard]
    assert thief.owns((await group.leases())[shard].owner)
    kept = next(sid for sid in group.shards if sid != shard)

    async def settled() -> tuple[Scrape, Scrape] | None:
        found = await scrape(ports[0]), await scrape(ports[1])
        return found if all(lag_shards(f) for f in found) else None

    old, new = await until(settled, 30, "both replicas report their shard's lag")
    assert value(old, "supersim_leases_held") == 1
    assert value(old, "supersim_leases_taken_total") == 2
    assert value(old, "supersim_leases_handed_over_total") == 1
    assert value(old, "supersim_leases_lost_total") == 0
    assert value(old, "supersim_leases_steal_requests_total") == 0
    assert lag_shards(old) == {kept}, "the handed-over shard's lag series is gone"
    assert value(new, "supersim_leases_held") == 1
    assert value(new, "supersim_leases_taken_total") == 1
    assert value(new, "supersim_leases_steal_requests_total") == 1
    assert value(new, "supersim_leases_handed_over_total") == 0
    assert lag_shards(new) == {shard}


async def test_a_replica_whose_list_shards_fails_stays_live_and_keeps_its_shard(
    group: Group,
) -> None:
    """While Kinesis refuses one replica's ListShards (Redis still answering), its
    heartbeat goes on: it stays in the live set for three lease TTLs and more, keeps its
    lease (same fencing token), and no peer asks for its shard."""
    proxy = await FaultProxy(group.kinesalite).start()
    try:
        group.env.update(SUPERSIM_DISCOVERY_INTERVAL="1")
        await group.create(2)
        cut_off = group.start(SUPERSIM_ENDPOINT_URL=proxy.url)
        other = group.start()
        await group.wait_balanced([1, 1], SETTLE)
        (shard,) = await group.held_by(cut_off)
        token = (await group.leases())[shard].token
        asked_before = len(other.events("lease_steal_requested"))  # while settling, maybe
        proxy.faults.fail_first["ListShards"] = proxy.calls["ListShards"] + 1_000_000

        async def failing() -> bool:
            return bool(cut_off.events("discovery_failed"))

        await group.wait_for(failing, 30, "the replica's ListShards failing")
        began = time.monotonic()
        while time.monotonic() - began < 3 * TTL + 1:
            live = await group.live_ids()
            assert any(cut_off.owns(replica) for replica in live), f"left the live set: {live}"
            state = (await group.leases())[shard]
            assert cut_off.owns(state.owner), state
            assert state.token == token, state
            assert state.thief is None, state
            await asyncio.sleep(0.2)
        assert len(other.events("lease_steal_requested")) == asked_before, "no steal request"
    finally:
        await proxy.stop()


async def test_a_shard_asked_for_by_a_replica_whose_list_shards_fails_is_read_after_a_crash(
    group: Group, tmp_path: Path
) -> None:
    """A replica asks the busiest one for a shard, then its ListShards starts failing, and
    the owner, still in its batch, is killed: the shard is not left reserved for a thief
    that never takes it (it balances on with the shards it last listed, and a request its
    rounds stop refreshing is void), and every shard is held again within the failover
    bound."""
    proxy = await FaultProxy(group.kinesalite).start()
    try:
        group.env.update(SUPERSIM_DISCOVERY_INTERVAL="1")
        await group.create(3)
        owner = group.start()
        await group.wait_balanced([3], SETTLE)
        group.start()
        await group.wait_balanced([2, 1], SETTLE)
        async with Trickle(group) as trickle:
            await trickle.wait_resumed(group.open_shards, time.monotonic(), within=SETTLE)
            mine = await group.held_by(owner)
            assert len(mine) == 2
            (tmp_path / str(owner.pid)).touch()  # the owner cannot hand a shard over

            async def held() -> bool:
                return all((tmp_path / f"{owner.pid}.{sid}.held").exists() for sid in mine)

            await group.wait_for(held, 30, "the owner's batches held")
            thief = group.start(SUPERSIM_ENDPOINT_URL=proxy.url)

            async def asked() -> str | None:
                leases = await group.leases()
                return next((s for s, st in leases.items() if thief.owns(st.thief)), None)

            shard = await until(asked, SETTLE, "the new replica asked for a shard")
            assert shard in mine
            proxy.faults.fail_first["ListShards"] = proxy.calls["ListShards"] + 1_000_000

            async def failing() -> bool:
                return bool(thief.events("discovery_failed"))

            await group.wait_for(failing, 30, "the thief's ListShards failing")
            owner.signal(signal.SIGKILL)
            await owner.wait(30)
            await group.wait_balanced([2, 1], FAILOVER)
    finally:
        await proxy.stop()


async def test_an_ended_shards_lag_series_is_removed(group: Group) -> None:
    """Once a split parent is read to its end, the replica stops serving its lag series,
    and serves its children's."""
    await group.create(1)
    port = servers.free_port()
    group.start(SUPERSIM_HTTP_PORT=str(port))
    await put(group.kinesalite, group.stream, events(20))
    (parent,) = group.shards

    async def lagging(shards: set[str]) -> Scrape | None:
        status, text = await get(port, "/metrics")
        found = samples(text) if status == 200 else {}
        return found if lag_shards(found) == shards else None

    await until(lambda: lagging({parent}), SETTLE, "the parent's lag served")
    async with kinesis_client(group.kinesalite) as client:
        listed = (await client.list_shards(StreamName=group.stream))["Shards"]
        hashes = listed[0]["HashKeyRange"]
        middle = (int(hashes["StartingHashKey"]) + int(hashes["EndingHashKey"])) // 2
        await client.split_shard(
            StreamName=group.stream, ShardToSplit=parent, NewStartingHashKey=str(middle)
        )
        await wait_active(client, group.stream)
    await put(group.kinesalite, group.stream, events(20, start=20))
    await group.list_shards()
    children = set(group.shards) - {parent}
    assert len(children) == 2
    await until(lambda: lagging(children), SETTLE, "only the children's lag served")
