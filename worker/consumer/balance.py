"""Which leases a replica takes or asks for in one balancing round (a pure function).

Every replica aims for ``target = ceil(leasable shards / live replicas)``, like the Kinesis
Client Library's lease taker. *Leasable* shards are those a reader may run on now: open
shards, closed parents not read to their end yet, and children whose parents are done
(the supervisor decides which). A round:

1. takes the leases its own steal requests were answered with (released for it), then
   free leases (no owner: never taken, released, or expired) up to the target, in shard
   order, skipping those another live replica's steal request reserves (a request by a
   replica no longer live is void, and so is one its replica's rounds stopped refreshing:
   the lease snapshot leaves it out); the other free ones are spares, taken in order in
   place of any that another replica takes first;
2. if still below the target, asks the most-loaded live replica for one shard (a steal
   request), when that replica holds more than the target, or holds the target while this
   one holds at most target - 2 (so 7 shards over 3 replicas end 3/2/2, never 3/3/1);
   requests already standing count as taken, and at most ``max_steals`` are made a round.

Nobody gives leases away on their own: a replica above its share loses the extra ones to
steal requests, so adding or removing a replica converges again within a few rounds, and
a crashed replica's leases are free once they expire.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from worker.consumer.leases import LeaseState


@dataclass(frozen=True, slots=True)
class Plan:
    target: int
    take: list[str] = field(default_factory=list)
    steal: list[tuple[str, str]] = field(default_factory=list)
    """(shard, its owner) pairs to send a steal request for."""
    spare: list[str] = field(default_factory=list)
    """More free shards, in order, to take instead of those of ``take`` another replica
    takes first (replicas taking a crashed or stopped one's shards race for them)."""


def plan(
    *,
    me: str,
    leasable: Sequence[str],
    leases: Mapping[str, LeaseState],
    live: Collection[str],
    mine: Collection[str],
    max_steals: int = 1,
) -> Plan:
    """One round's plan for replica ``me``, which holds (reads) the shards in ``mine``;
    ``live`` are the live replicas (a steal request by any other replica is void)."""
    replicas = set(live) | {me}
    target = math.ceil(len(leasable) / len(replicas)) if leasable else 0
    states = {sid: _state(leases, sid, replicas) for sid in leasable}
    held = [sid for sid in leasable if sid in mine]
    asked = [sid for sid in leasable if sid not in mine and states[sid].thief == me]
    # Shards handed over to this replica: taken whatever the count (they are counted).
    claim = [sid for sid in asked if states[sid].owner is None]
    want = target - len(held) - len(asked)
    if want <= 0:
        return Plan(target, claim)
    free = [
        sid
        for sid in leasable
        if sid not in mine and states[sid].owner is None and states[sid].thief is None
    ]
    free, spare = free[:want], free[want:]
    take = claim + free
    want -= len(free)
    if want <= 0:
        return Plan(target, take, spare=spare)
    # What each other live replica will hold once the requests standing are answered.
    load = Counter(
        owner
        for sid in leasable
        if (owner := states[sid].owner) is not None and owner in replicas and owner != me
        if states[sid].thief is None
    )
    steal: list[tuple[str, str]] = []
    count = len(held) + len(asked) + len(free)
    for victim, victim_count in load.most_common():
        if len(steal) >= min(want, max_steals):
            break
        if victim_count > target or (victim_count == target and count <= target - 2):
            candidates = [
                sid for sid in leasable if states[sid].owner == victim and states[sid].thief is None
            ]
            if candidates:
                steal.append((candidates[-1], victim))
                count += 1
    return Plan(target, take, steal)


def _state(leases: Mapping[str, LeaseState], shard_id: str, live: Collection[str]) -> LeaseState:
    """The shard's lease, a steal request by a replica that is not live left out."""
    state = leases.get(shard_id) or LeaseState(shard_id, None, None, None, None)
    if state.thief is not None and state.thief not in live:
        return replace(state, thief=None)
    return state
