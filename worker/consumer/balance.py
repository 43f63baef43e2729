"""Which leases a replica takes or asks for in one balancing round (a pure function).

Every replica aims for ``target = ceil(leasable shards / live replicas)``, like the Kinesis
Client Library's lease taker. *Leasable* shards are those a reader may run on now: open
shards, closed parents not read to their end yet, and children whose parents are done
(the supervisor decides which). A round:

1. takes free leases (no owner: never taken, released, or expired) up to the target, in
   shard order, skipping those another replica's steal request reserves;
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
from dataclasses import dataclass, field

from worker.consumer.leases import LeaseState


@dataclass(frozen=True, slots=True)
class Plan:
    target: int
    take: list[str] = field(default_factory=list)
    steal: list[tuple[str, str]] = field(default_factory=list)
    """(shard, its owner) pairs to send a steal request for."""


def plan(
    *,
    me: str,
    leasable: Sequence[str],
    leases: Mapping[str, LeaseState],
    live: Collection[str],
    mine: Collection[str],
    max_steals: int = 1,
) -> Plan:
    """One round's plan for replica ``me``, which holds (reads) the shards in ``mine``."""
    replicas = set(live) | {me}
    target = math.ceil(len(leasable) / len(replicas)) if leasable else 0
    held = [sid for sid in leasable if sid in mine]
    asked = [sid for sid in leasable if sid not in mine and _state(leases, sid).thief == me]
    want = target - len(held) - len(asked)
    if want <= 0:
        return Plan(target)
    take = [
        sid
        for sid in leasable
        if sid not in mine and _state(leases, sid).owner is None
        if _state(leases, sid).thief in (None, me)
    ][:want]
    want -= len(take)
    if want <= 0:
        return Plan(target, take)
    load = Counter(
        owner
        for sid in leasable
        if (owner := _state(leases, sid).owner) is not None and owner in replicas and owner != me
    )
    steal: list[tuple[str, str]] = []
    count = len(held) + len(asked) + len(take)
    for victim, victim_count in load.most_common():
        if len(steal) >= min(want, max_steals):
            break
        if victim_count > target or (victim_count == target and count <= target - 2):
            candidates = [
                sid
                for sid in leasable
                if _state(leases, sid).owner == victim and _state(leases, sid).thief is None
            ]
            if candidates:
                steal.append((candidates[-1], victim))
                count += 1
    return Plan(target, take, steal)


def _state(leases: Mapping[str, LeaseState], shard_id: str) -> LeaseState:
    return leases.get(shard_id) or LeaseState(shard_id, None, None, None, None)
