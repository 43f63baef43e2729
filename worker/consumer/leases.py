"""Shard leases and replica liveness in Redis, with fencing tokens.

A lease is a hash ``{owner, token}`` at ``keys.lease(...)`` that expires with its TTL (Redis
server time: no wall clocks are compared across hosts). Every take increments the shard's
fencing counter, so a token identifies one tenure: a checkpoint write carrying an older
token is refused (see ``worker.consumer.checkpoints``).

Replicas of a consumer group announce themselves in one sorted set (``keys.replicas``:
replica id → heartbeat expiry in Redis server milliseconds), renewed with their leases, so
the live replicas are known from one read, without scanning the keyspace.

Stealing: a replica below its share asks for a lease with a *steal request*
(``keys.steal``: the thief, when the owner must have answered by, and until when the
thief's balancing rounds vouch for it). The owner sees it on its next renewal, finishes its
batch, checkpoints and releases; while the request stands only the thief may take the
lease, as long as it lives *and runs its balancing rounds*: each round refreshes its
standing requests (``snapshot(..., refresh=True)``), and a request not refreshed for a
lease TTL, or by a replica that left the live set, is void (the owner keeps reading, and
anyone may take the lease once free), so a replica that heartbeats but cannot balance
(stuck in a listener hook) holds no shard back for long. Once the lease is released, or
its renewal refused, the request lasts at most about a TTL more: the thief claims it at
its next round or loses it. An owner that does not answer within the request's bound has
its renewals refused, so the lease expires and is taken as after a crash (its late writes
are fenced off). The bound covers the slowest batch the owner may legitimately be handling
(``worker.consumer.supervisor.steal_bound``): the larger of the thief's and the owner's
own, which the owner stores in the lease hash when it takes it (replicas with different
settings or handlers agree on the longer one). All reads a balancing round needs are one
script call: O(shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

from redis.asyncio import Redis

from worker import keys

_NOW: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_STANDS: Final = """
-- Whether a steal request ({thief, until, fresh} from HMGET) holds: its thief is live and
-- its balancing rounds still refresh it (a request without 'fresh' is an older version's).
local function stands(asked, replicas, now)
  if not asked[1] then return false end
  local beat = redis.call('ZSCORE', replicas, asked[1])
  if not beat or tonumber(beat) <= now then return false end
  return not asked[3] or tonumber(asked[3]) > now
end
"""

_ACQUIRE: Final = (
    _NOW
    + _STANDS
    + """
-- KEYS: lease, fence, steal request, replicas. ARGV: owner, ttl ms, owner's steal bound ms.
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return {0, owner} end
local asked = redis.call('HMGET', KEYS[3], 'thief', 'until', 'fresh')
if asked[1] and asked[1] ~= ARGV[1] and stands(asked, KEYS[4], now) then
  return {0, asked[1]}  -- reserved for the thief
end
redis.call('DEL', KEYS[3])
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token, 'bound', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, tostring(token)}
"""
)

_RENEW: Final = (
    _NOW
    + _STANDS
    + """
-- KEYS: lease, steal request, lag hash, replicas. ARGV: owner, token, ttl ms, shard, lag
-- ('' if none).
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[4], ARGV[5]) end
local asked = redis.call('HMGET', KEYS[2], 'thief', 'until', 'fresh')
if asked[1] then
  if stands(asked, KEYS[4], now) then
    if now > tonumber(asked[2]) then
      -- the owner did not answer in time: the lease expires within a TTL, and the thief
      -- must claim it within one more
      if redis.call('PTTL', KEYS[2]) > 2 * tonumber(ARGV[3]) then
        redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[3]))
      end
      return 0
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 2
  end
  redis.call('DEL', KEYS[2])  -- the thief is gone or stuck: its request is void, keep reading
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

_RELEASE: Final = """
-- KEYS: lease, steal request. ARGV: owner, token, ttl ms.
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
-- released for a thief: it claims the lease at its next round, or the reservation lapses
if redis.call('PTTL', KEYS[2]) > tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""

_STEAL: Final = (
    _NOW
    + """
-- KEYS: lease, steal request. ARGV: victim, thief, thief's bound ms, thief's ttl ms.
local cur = redis.call('HMGET', KEYS[1], 'owner', 'bound')
if cur[1] ~= ARGV[1] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
-- the longer of the two bounds: the owner knows the slowest batch it may be handling
local bound = math.max(tonumber(ARGV[3]), tonumber(cur[2] or 0) or 0)
redis.call('HSET', KEYS[2], 'thief', ARGV[2], 'until', now + bound, 'fresh', now + tonumber(ARGV[4]))
-- kept past the bound by a lease TTL: the lease expires in between, and the thief takes it
redis.call('PEXPIRE', KEYS[2], bound * 2 + 10000)
return 1
"""
)

_HEARTBEAT: Final = """
-- KEYS: replicas. ARGV: replica ('' to only read), ttl ms. Returns {now ms, id, expiry, ...}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
local out = {tostring(now)}
for _, v in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do out[#out + 1] = v end
return out
"""

_SNAPSHOT: Final = (
    _NOW
    + """
-- KEYS: per shard its lease then its steal request. ARGV: this replica ('' to only read),
-- ttl ms. Returns per shard owner, token, pttl, thief (a request void for staleness left
-- out); this replica's own requests are refreshed for a TTL (its balancing round runs).
local out = {}
for i = 1, #KEYS, 2 do
  local cur = redis.call('HMGET', KEYS[i], 'owner', 'token')
  out[#out + 1] = cur[1] or ''
  out[#out + 1] = cur[2] or ''
  out[#out + 1] = redis.call('PTTL', KEYS[i])
  local asked = redis.call('HMGET', KEYS[i + 1], 'thief', 'fresh')
  local thief = asked[1]
  if thief and thief == ARGV[1] then
    redis.call('HSET', KEYS[i + 1], 'fresh', now + tonumber(ARGV[2]))
  elseif thief and asked[2] and tonumber(asked[2]) <= now then
    thief = false
  end
  out[#out + 1] = thief or ''
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Lease:
    shard_id: str
    owner: str
    token: str


class Renewal(Enum):
    KEPT = 1
    LOST = 0
    HAND_OVER = 2
    """Kept for now, but another replica asked for it: finish the batch and release."""


@dataclass(frozen=True, slots=True)
class LeaseState:
    """One shard's lease as read in a balancing round."""

    shard_id: str
    owner: str | None
    token: str | None
    expires_in_ms: int | None
    thief: str | None


@dataclass(frozen=True, slots=True)
class Replicas:
    """The live replicas of the group: id → heartbeat expiry (Redis server ms)."""

    now_ms: int
    expiry_ms: dict[str, int]


class LeaseManager:
    """Takes, renews, releases and steals shard leases for one owner (this process)."""

    def __init__(self, redis: Redis, key_prefix: str, owner: str, ttl_seconds: float) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self.owner = owner
        self.ttl_ms = int(ttl_seconds * 1000)
        self.steal_bound_ms = 0
        """Stored with each lease taken: a steal request for it stands at least this long
        (the slowest batch this replica may legitimately be handling; the supervisor sets
        it), whatever the thief's own settings say."""
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._steal = redis.register_script(_STEAL)
        self._heartbeat = redis.register_script(_HEARTBEAT)
        self._snapshot = redis.register_script(_SNAPSHOT)

    async def acquire(self, shard_id: str) -> Lease | None:
        """Take the shard's lease with a new fencing token, or None if another owner holds
        it (or another replica's steal request reserves it)."""
        ok, value = await self._acquire(
            keys=[
                keys.lease(self._prefix, shard_id),
                keys.fence(self._prefix, shard_id),
                keys.steal(self._prefix, shard_id),
                keys.replicas(self._prefix),
            ],
            args=[self.owner, self.ttl_ms, self.steal_bound_ms],
        )
        if not ok:
            return None
        return Lease(shard_id, self.owner, _text(value))

    async def renew(self, lease: Lease, millis_behind: int | None = None) -> Renewal:
        """Extend the lease (and record the shard's lag for ``status``): KEPT, LOST
        (expired and taken, released, or a steal request went unanswered too long), or
        HAND_OVER (kept, but asked for by another replica)."""
        found = await self._renew(
            keys=[
                keys.lease(self._prefix, lease.shard_id),
                keys.steal(self._prefix, lease.shard_id),
                keys.lag(self._prefix),
                keys.replicas(self._prefix),
            ],
            args=[
                lease.owner,
                lease.token,
                self.ttl_ms,
                lease.shard_id,
                "" if millis_behind is None else str(millis_behind),
            ],
        )
        return Renewal(int(found))

    async def release(self, lease: Lease) -> bool:
        """Give the lease back (False if no longer ours); a steal request standing for it
        then lasts at most a TTL more, for the thief to claim it."""
        return bool(
            await self._release(
                keys=[
                    keys.lease(self._prefix, lease.shard_id),
                    keys.steal(self._prefix, lease.shard_id),
                ],
                args=[lease.owner, lease.token, self.ttl_ms],
            )
        )

    async def request_steal(self, shard_id: str, victim: str, bound_ms: int) -> bool:
        """Ask ``victim`` to hand the shard over within ``bound_ms`` (or the bound the
        victim stored with its lease, if longer): True if asked now; False if it no longer
        holds it or a request already stands. The request holds while this replica's
        balancing rounds refresh it (``snapshot``)."""
        return bool(
            await self._steal(
                keys=[keys.lease(self._prefix, shard_id), keys.steal(self._prefix, shard_id)],
                args=[victim, self.owner, bound_ms, self.ttl_ms],
            )
        )

    async def heartbeat(self, *, alive: bool = True) -> Replicas:
        """Announce this replica as live for a TTL (``alive``; else only read) and return
        the live replicas."""
        raw = await self._heartbeat(
            keys=[keys.replicas(self._prefix)],
            args=[self.owner if alive else "", self.ttl_ms],
        )
        return _replicas(raw)

    async def leave(self) -> None:
        """Remove this replica from the live set (a graceful stop)."""
        await self._redis.zrem(keys.replicas(self._prefix), self.owner)

    async def snapshot(
        self, shard_ids: Sequence[str], *, refresh: bool = False
    ) -> dict[str, LeaseState]:
        """Every listed shard's lease and steal request, in one call (a request whose
        thief's rounds stopped refreshing it is void, left out). ``refresh``: this is this
        replica's balancing round, which keeps its own standing requests for a TTL more."""
        if not shard_ids:
            return {}
        names: list[str] = []
        for sid in shard_ids:
            names += [keys.lease(self._prefix, sid), keys.steal(self._prefix, sid)]
        raw = await self._snapshot(keys=names, args=[self.owner if refresh else "", self.ttl_ms])
        return snapshot_states(shard_ids, raw)

    async def holder(self, shard_id: str) -> str | None:
        owner = await self._redis.hget(keys.lease(self._prefix, shard_id), "owner")  # type: ignore[misc]  # redis-py types sync|async
        return None if owner is None else _text(owner)


def snapshot_states(shard_ids: Sequence[str], raw: Sequence[object]) -> dict[str, LeaseState]:
    states = {}
    for index, sid in enumerate(shard_ids):
        owner, token, pttl, thief = raw[index * 4 : index * 4 + 4]
        ttl = int(_text(pttl))  # type: ignore[arg-type]
        states[sid] = LeaseState(
            sid,
            _text(owner) or None,  # type: ignore[arg-type]
            _text(token) or None,  # type: ignore[arg-type]
            ttl if ttl >= 0 else None,
            _text(thief) or None,  # type: ignore[arg-type]
        )
    return states


def read_replicas(raw: Sequence[object]) -> Replicas:
    return _replicas(raw)


def _replicas(raw: Sequence[object]) -> Replicas:
    values = [_text(item) for item in raw]  # type: ignore[arg-type]
    now = int(values[0])
    members = values[1:]
    return Replicas(
        now, {members[i]: int(float(members[i + 1])) for i in range(0, len(members), 2)}
    )


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
