"""Replicas share the shards (issue #12), as real ``supersim-worker run`` processes on
kinesalite and one redis-server: balance, crash failover, graceful handoff, a replica
added, a stopped owner fenced off, a split and a merge, and what ``status`` shows.

Each scenario has its own stream and consumer group, and takes tens of seconds (process
start-up, lease TTLs), so they all start together, as tasks on the module's event loop,
when the first test asks for them; each test awaits its scenario's outcome and states what
must hold. Times are asserted only with bounds that tell the mechanisms apart (failover
within 10 s at a 4 s lease TTL; a handoff far below a 30 s TTL, so by release, not
expiry); the measured figures are in ``tests/bench/scale_bench.py``.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import servers
from kinesis_support import events, kinesis_client, put, wait_active
from replica_support import (
    Group,
    Replica,
    Trickle,
    check_status_shape,
    duplicates,
    sids,
)

from worker import keys

# Alone: its scenarios run about 16 worker processes at once, which would starve a file
# running beside it in the other test process of the CPU its leases' renewals need.
pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
    pytest.mark.alone,
]

SHORT_TTL = 4
"""Lease TTL (s) where a test waits for leases to expire: the 10 s bound holds with margin."""
LONG_TTL = 30
"""Lease TTL (s) where a takeover must not come from expiry."""
FAILOVER_BOUND = 10.0
HANDOFF_BOUND = 5.0
SETTLE = 60.0
"""Seconds allowed for a group to settle, start-up included, on a loaded 2-core machine."""


# --- the scenarios ---------------------------------------------------------------------------


@dataclass
class Crash:
    balanced: dict[str, Any]
    """``status`` once 3 replicas settled and every record was handled."""
    victim: Replica
    victim_shards: list[str]
    tokens_before: dict[str, str | None]
    failover_s: float
    """From kill -9 until a record put on each of its shards after the kill was handled."""
    after: dict[str, Any]
    expected: set[str]
    handled: list[tuple[str, str, str]]


async def balance_then_crash(group: Group) -> Crash:
    """3 replicas on 8 shards (records put before and while they run), then kill -9 one."""
    await group.create(8)
    before, during = events(300), events(300, start=300)
    await put(group.kinesalite, group.stream, before)
    for _ in range(3):
        group.start()
    await put(group.kinesalite, group.stream, during)
    await group.wait_balanced([3, 3, 2], SETTLE)
    await wait_handled(group, sids(before + during), SETTLE)
    await wait_lag_recorded(group)
    balanced = await group.status()
    async with Trickle(group) as trickle:
        counts = await group.counts()
        victim = max(group.live(), key=lambda r: counts[r.name])
        victim_shards = await group.held_by(victim)
        leases = await group.leases()
        tokens_before = {sid: leases[sid].token for sid in victim_shards}
        killed = time.monotonic()
        victim.signal(signal.SIGKILL)
        failover = await trickle.wait_resumed(victim_shards, killed, within=30)
        await group.wait_balanced([4, 4], SETTLE)
        trickled = await trickle.wait_all_handled(SETTLE)
    return Crash(
        balanced=balanced,
        victim=victim,
        victim_shards=victim_shards,
        tokens_before=tokens_before,
        failover_s=failover,
        after=await group.status(),
        expected=sids(before + during) | trickled,
        handled=await group.handled(),
    )


@dataclass
class Handoff:
    victim: Replica
    victim_shards: list[str]
    handoff_s: float
    exit_code: int
    after: dict[str, Any]
    handled: list[tuple[str, str, str]]
    trickled: set[str]


async def sigterm_handoff(group: Group) -> Handoff:
    """3 replicas on 8 shards with a 30 s lease TTL; SIGTERM one."""
    await group.create(8)
    for _ in range(3):
        group.start()
    await group.wait_balanced([3, 3, 2], SETTLE)
    async with Trickle(group) as trickle:
        await trickle.wait_resumed(group.open_shards, time.monotonic(), within=SETTLE)
        counts = await group.counts()
        victim = max(group.live(), key=lambda r: counts[r.name])
        victim_shards = await group.held_by(victim)
        stopped = time.monotonic()
        victim.signal(signal.SIGTERM)
        handoff = await trickle.wait_resumed(victim_shards, stopped, within=LONG_TTL + 10)
        exit_code = await victim.wait(30)
        await group.wait_balanced([4, 4], SETTLE)
        trickled = await trickle.wait_all_handled(SETTLE)
    return Handoff(
        victim=victim,
        victim_shards=victim_shards,
        handoff_s=handoff,
        exit_code=exit_code,
        after=await group.status(),
        handled=await group.handled(),
        trickled=trickled,
    )


@dataclass
class ScaleOut:
    added: Replica
    converged_s: float
    worst_wait: tuple[str, float]
    """The longest a record put while leases moved waited to be handled (shard, s)."""
    after: dict[str, Any]
    handled: list[tuple[str, str, str]]
    trickled: set[str]


async def add_a_fourth(group: Group) -> ScaleOut:
    """3 replicas on 8 shards (default lease TTL), records flowing; a 4th one starts."""
    await group.create(8)
    for _ in range(3):
        group.start()
    await group.wait_balanced([3, 3, 2], SETTLE)
    async with Trickle(group) as trickle:
        await trickle.wait_resumed(group.open_shards, time.monotonic(), within=SETTLE)
        began = time.monotonic()
        added = group.start()
        converged = await group.wait_balanced([2, 2, 2, 2], SETTLE)
        ended = time.monotonic()
        trickled = await trickle.wait_all_handled(SETTLE)
        worst = trickle.latencies(began, ended)[0]
    return ScaleOut(
        added=added,
        converged_s=converged,
        worst_wait=worst,
        after=await group.status(),
        handled=await group.handled(),
        trickled=trickled,
    )


@dataclass
class Stopped:
    victim: Replica
    victim_shards: list[str]
    stopped_at: float
    while_stopped: dict[str, Any]
    regressions: list[tuple[str, str, str]]
    """(shard, checkpoint, the lower one written after it): a stale write got through."""
    put_at: dict[str, float]
    handled: list[tuple[str, str, str]]
    after: dict[str, Any]
    trickled: set[str]
    logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


async def stop_past_ttl(group: Group, flags: Path) -> Stopped:
    """3 replicas on 8 shards (4 s TTL, records every 0.1 s); one stops itself (SIGSTOP)
    in the middle of a batch (``RECORDING_STOP_DIR`` is ``flags``), is left stopped for
    twice its TTL, then gets SIGCONT."""
    await group.create(8)
    for _ in range(3):
        group.start()
    await group.wait_balanced([3, 3, 2], SETTLE)
    async with Trickle(group, period=0.1) as trickle, CheckpointWatch(group) as watch:
        await trickle.wait_resumed(group.open_shards, time.monotonic(), within=SETTLE)
        counts = await group.counts()
        victim = max(group.live(), key=lambda r: counts[r.name])
        victim_shards = await group.held_by(victim)
        (flags / str(victim.pid)).touch()

        async def is_stopped() -> bool:
            return victim.stopped()

        await group.wait_for(is_stopped, 30, "the replica stopped itself mid-batch", 0.02)
        stopped = time.monotonic()
        await trickle.wait_resumed(victim_shards, stopped, within=30)
        while_stopped = await group.status()
        await asyncio.sleep(max(0.0, stopped + 2 * SHORT_TTL - time.monotonic()))
        victim.signal(signal.SIGCONT)

        async def readers_stopped() -> bool:
            lost = {e["shard_id"] for e in victim.events("lease_lost", "lease_unconfirmed")}
            return set(victim_shards) <= lost

        await group.wait_for(readers_stopped, 30, "the woken replica's readers stopped")
        await group.wait_balanced([3, 3, 2], SETTLE)
        trickled = await trickle.wait_all_handled(SETTLE)
    return Stopped(
        victim=victim,
        victim_shards=victim_shards,
        stopped_at=stopped,
        while_stopped=while_stopped,
        regressions=watch.regressions,
        put_at={sid: at for sid, (_, at) in trickle.put_at.items()},
        handled=await group.handled(),
        after=await group.status(),
        trickled=trickled,
        logs={r.name: r.events() for r in group.replicas},
    )


@dataclass
class Reshard:
    split: str
    merged: tuple[str, str]
    children: dict[str, list[str]]
    """Parent → its children."""
    handled: list[tuple[str, str, str]]
    expected: set[str]
    after: dict[str, Any]


async def split_and_merge(group: Group) -> Reshard:
    """3 replicas on 8 shards; a shard of a replica at its share (3) is split, then two
    adjacent shards are merged, records put before, between and after. ListShards is left
    to its interval (300 s here): every replica must find the children through the
    parents' ends (the parent's own reader, at its share again once it took one child,
    cannot take the other)."""
    await group.create(8)
    batches = [events(200, start=200 * i) for i in range(3)]
    await put(group.kinesalite, group.stream, batches[0])
    for _ in range(3):
        group.start()
    await group.wait_balanced([3, 3, 2], SETTLE)
    counts = await group.counts()
    busiest = max(group.live(), key=lambda r: counts[r.name])
    parent = (await group.held_by(busiest))[0]
    index = group.shards.index(parent)
    pair = next(
        (group.shards[i], group.shards[i + 1])
        for i in range(len(group.shards) - 1)
        if parent not in (group.shards[i], group.shards[i + 1])
    )
    async with kinesis_client(group.kinesalite) as client:
        listed = (await client.list_shards(StreamName=group.stream))["Shards"]
        hash_range = listed[index]["HashKeyRange"]
        middle = (int(hash_range["StartingHashKey"]) + int(hash_range["EndingHashKey"])) // 2
        await client.split_shard(
            StreamName=group.stream, ShardToSplit=parent, NewStartingHashKey=str(middle)
        )
        await wait_active(client, group.stream)
        await put(group.kinesalite, group.stream, batches[1])
        await group.list_shards()
        await wait_handled(group, sids(batches[0] + batches[1]), SETTLE)
        await group.wait_balanced([3, 3, 3], SETTLE)
        await client.merge_shards(
            StreamName=group.stream, ShardToMerge=pair[0], AdjacentShardToMerge=pair[1]
        )
        await wait_active(client, group.stream)
        await put(group.kinesalite, group.stream, batches[2])
        listed = (await client.list_shards(StreamName=group.stream))["Shards"]
    await group.list_shards()
    children: dict[str, list[str]] = {}
    for shard in listed:
        for key in ("ParentShardId", "AdjacentParentShardId"):
            if shard.get(key) in (parent, *pair):
                children.setdefault(shard[key], []).append(shard["ShardId"])
    expected = sids(batches[0] + batches[1] + batches[2])
    await wait_handled(group, expected, SETTLE)
    await group.wait_balanced([3, 3, 2], SETTLE)
    return Reshard(
        split=parent,
        merged=pair,
        children=children,
        handled=await group.handled(),
        expected=expected,
        after=await group.status(),
    )


# --- helpers ---------------------------------------------------------------------------------


async def wait_handled(group: Group, expected: set[str], within: float) -> None:
    async def all_handled() -> bool:
        return expected <= {sid for _, _, sid in await group.handled()}

    await group.wait_for(all_handled, within, f"{len(expected)} records handled", interval=0.3)


async def wait_lag_recorded(group: Group) -> None:
    """Wait until every open shard's lag was recorded (with a lease renewal)."""

    async def recorded() -> bool:
        lag = await group.redis.hkeys(keys.lag(group.key_prefix))  # type: ignore[misc]
        return set(group.open_shards) <= {sid.decode() for sid in lag}

    await group.wait_for(recorded, SETTLE, "lag recorded for every shard")


class CheckpointWatch:
    """Reads the group's checkpoints every 20 ms while running; notes any that went back
    (what a stale owner's write would do: its batch is older than the new owner's)."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self.regressions: list[tuple[str, str, str]] = []

    async def __aenter__(self) -> CheckpointWatch:
        self._task = asyncio.create_task(self._watch(), name="checkpoint-watch")
        return self

    async def __aexit__(self, *_: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        last: dict[str, str] = {}
        while True:
            for shard, value in (await self._group.checkpoints()).items():
                before = last.get(shard)
                if before and before.isdigit() and value.isdigit() and int(value) < int(before):
                    self.regressions.append((shard, before, value))
                last[shard] = value
            await asyncio.sleep(0.02)


def twice(handled: list[tuple[str, str, str]]) -> str:
    """Which records were handled more than once, by shard, for an assertion message."""
    repeated = duplicates(handled)
    shards = Counter(shard for shard, _, sid in handled if sid in repeated)
    return f"{len(repeated)} records handled more than once, per shard {dict(shards)}"


def owners(status: dict[str, Any]) -> dict[str, str | None]:
    return {row["shard_id"]: row["owner"] for row in status["shards"]}


def leases_of(status: dict[str, Any]) -> list[int]:
    return sorted(replica["leases"] for replica in status["replicas"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scenarios(
    redis_server: servers.RedisServer,
    kinesalite_server: servers.KinesaliteServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[str, asyncio.Task[Any]]]:
    """Every scenario, started at once on its own stream and group (the servers reset
    first); each test awaits the one it checks. Replicas are killed at the end."""
    redis_server.flush()
    kinesalite_server.reset()
    logs = tmp_path_factory.mktemp("replicas")
    flags = tmp_path_factory.mktemp("stop-flags")
    groups: list[Group] = []

    def group(**env: str) -> Group:
        made = Group(kinesalite_server.url, redis_server.url, logs, env=env)
        groups.append(made)
        return made

    runs: dict[str, Callable[[], Awaitable[Any]]] = {
        "crash": lambda: balance_then_crash(group(SUPERSIM_LEASE_TTL=str(SHORT_TTL))),
        "handoff": lambda: sigterm_handoff(group(SUPERSIM_LEASE_TTL=str(LONG_TTL))),
        "scale_out": lambda: add_a_fourth(group()),
        "stopped": lambda: stop_past_ttl(
            group(SUPERSIM_LEASE_TTL=str(SHORT_TTL), RECORDING_STOP_DIR=str(flags)), flags
        ),
        "reshard": lambda: split_and_merge(group(SUPERSIM_DISCOVERY_INTERVAL="300")),
    }
    with pytest.MonkeyPatch.context() as env:  # for the in-process Kinesis clients
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        tasks = {name: asyncio.create_task(run(), name=name) for name, run in runs.items()}
        try:
            yield tasks
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            for made in groups:
                await made.close()


# --- the tests -------------------------------------------------------------------------------


async def test_three_replicas_settle_at_3_3_2_and_handle_every_record(
    scenarios: dict[str, asyncio.Task[Any]],
) -> None:
    """3 replicas on 8 shards hold 3/3/2 leases, and every record put before and while
    they run is handled; status shows each shard's owner, token, checkpoint and lag."""
    crash: Crash = await scenarios["crash"]
    status = crash.balanced
    check_status_shape(status)
    assert leases_of(status) == [2, 3, 3]
    assert len(status["replicas"]) == 3
    assert all(replica["heartbeat_age_s"] < SHORT_TTL for replica in status["replicas"])
    live = {replica["id"] for replica in status["replicas"]}
    for row in status["shards"]:
        assert row["owner"] in live
        assert row["token"].isdigit()
        assert row["checkpoint"].isdigit(), "every shard had records, all handled"
        assert isinstance(row["millis_behind"], int)
    assert crash.expected <= {sid for _, _, sid in crash.handled}


async def test_killed_replica_shards_are_read_elsewhere_within_10_s(
    scenarios: dict[str, asyncio.Task[Any]],
) -> None:
    """After kill -9, the dead replica's shards get new owners (new fencing tokens) and
    records put after the kill are handled within 10 s (4 s TTL); nothing is lost."""
    crash: Crash = await scenarios["crash"]
    assert crash.failover_s < FAILOVER_BOUND, f"read again after {crash.failover_s:.1f} s"
    after = crash.after
    check_status_shape(after)
    assert leases_of(after) == [4, 4]
    assert not any(crash.victim.owns(replica["id"]) for replica in after["replicas"])
    for sid in crash.victim_shards:
        row = next(row for row in after["shards"] if row["shard_id"] == sid)
        assert row["owner"]
        assert not crash.victim.owns(row["owner"])
        assert int(row["token"]) > int(crash.tokens_before[sid] or 0)
    assert crash.expected <= {sid for _, _, sid in crash.handled}, "nothing lost"


async def test_sigterm_hands_shards_over_by_release_not_expiry(
    scenarios: dict[str, asyncio.Task[Any]],
) -> None:
    """On SIGTERM a replica exits 0 and its shards are read elsewhere far sooner than its
    30 s lease TTL (released, not expired), without handling any record twice."""
    handoff: Handoff = await scenarios["handoff"]
    assert handoff.exit_code == 0, handoff.victim.tail()
    assert handoff.handoff_s < HANDOFF_BOUND, f"read again after {handoff.handoff_s:.1f} s"
    after = handoff.after
    check_status_shape(after)
    assert leases_of(after) == [4, 4]
    assert not any(handoff.victim.owns(replica["id"]) for replica in after["replicas"])
    assert not any(handoff.victim.owns(row["owner"]) for row in after["shards"])
    assert handoff.trickled <= {sid for _, _, sid in handoff.handled}
    assert not duplicates(handoff.handled), twice(handoff.handled)


async def test_added_replica_gets_its_share_and_no_shard_waits_past_failover(
    scenarios: dict[str, asyncio.Task[Any]],
) -> None:
    """A 4th replica gets leases until 2/2/2/2; meanwhile no record waits longer than the
    failover bound, every one is handled, and none twice (leases move by hand-over)."""
    scale: ScaleOut = await scenarios["scale_out"]
    after = scale.after
    check_status_shape(after)
    assert leases_of(after) == [2, 2, 2, 2]
    added = next(r for r in after["replicas"] if scale.added.owns(r["id"]))
    assert added["leases"] == 2
    shard, waited = scale.worst_wait
    assert waited < FAILOVER_BOUND, f"a record on {shard} waited {waited:.1f} s"
    assert scale.trickled <= {sid for _, _, sid in scale.handled}
    assert not duplicates(scale.handled), twice(scale.handled)


async def test_stopped_owner_is_fenced_off_and_rejoins(
    scenarios: dict[str, asyncio.Task[Any]],
) -> None:
    """A replica SIGSTOPped past its lease TTL loses its shards to the others; woken, its
    late checkpoint writes are refused (no checkpoint ever goes back), its readers stop
    (it reads nothing put after it was stopped on its old shards: no record put since is
    handled twice), and it rejoins with its share."""
    stopped: Stopped = await scenarios["stopped"]
    victim = stopped.victim
    check_status_shape(stopped.while_stopped)
    assert not any(victim.owns(r["id"]) for r in stopped.while_stopped["replicas"])
    for sid in stopped.victim_shards:
        owner = owners(stopped.while_stopped)[sid]
        assert owner
        assert not victim.owns(owner)
    assert not stopped.regressions, "a stale checkpoint write got through"
    refused = [
        e for e in stopped.logs[victim.name] if e["event"] == "lease_lost" and e.get("error")
    ]
    assert refused, "the in-flight batch's late checkpoint write was refused by the fence"
    lost = Counter(e["shard_id"] for e in stopped.logs[victim.name] if e["event"] == "lease_lost")
    assert max(lost.values()) <= 2, f"lost leases still renewed and reported: {lost}"
    for name, entries in stopped.logs.items():
        assert not [e for e in entries if e["event"] == "checkpoint_moved"], name
    twice = duplicates(stopped.handled)
    late = [sid for sid in twice if stopped.put_at.get(sid, 0) > stopped.stopped_at]
    assert not late, "a record put after the stop was handled twice: a stale reader read on"
    after = stopped.after
    assert leases_of(after) == [2, 3, 3]
    assert next(r for r in after["replicas"] if victim.owns(r["id"]))["leases"] >= 2
    assert stopped.trickled <= {sid for _, _, sid in stopped.handled}


async def test_split_and_merge_read_parents_before_children_and_stay_balanced(
    scenarios: dict[str, asyncio.Task[Any]],
) -> None:
    """A split and a merge while 3 replicas run: every record handled once, each parent to
    its end before any of its children, in sequence order per shard; the 8 open shards
    end 3/3/2, and status shows the parents ended with their children."""
    reshard: Reshard = await scenarios["reshard"]
    handled = reshard.handled
    sids_handled = [sid for _, _, sid in handled]
    assert set(sids_handled) == reshard.expected
    assert not duplicates(handled), twice(handled)
    shards = [shard for shard, _, _ in handled]
    assert sorted(reshard.children) == sorted([reshard.split, *reshard.merged])
    for parent, children in reshard.children.items():
        last = len(shards) - 1 - shards[::-1].index(parent)
        for child in children:
            assert last < shards.index(child), f"{child} read before its parent {parent} ended"
    for shard in set(shards):
        sequences = [int(seq) for s, seq, _ in handled if s == shard]
        assert sequences == sorted(sequences)
    after = reshard.after
    check_status_shape(after)
    rows = {row["shard_id"]: row for row in after["shards"]}
    for parent, children in reshard.children.items():
        assert rows[parent]["state"] == "ended"
        assert rows[parent]["checkpoint"] == keys.SHARD_END
        assert sorted(rows[parent]["children"]) == sorted(children)
        for child in children:
            assert parent in rows[child]["parents"]
            assert rows[child]["owner"]
    assert leases_of(after) == [2, 3, 3]
