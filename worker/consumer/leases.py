"""Shard leases in Redis, with fencing tokens.

A lease is a hash ``{owner, token}`` at ``keys.lease(...)`` that expires with its TTL (Redis
server time: no wall clocks are compared across hosts). Every take increments the shard's
fencing counter, so a token identifies one tenure: a checkpoint write carrying an older
token is refused (see ``worker.consumer.checkpoints``). This worker takes every shard it can; a
shard leased by another live replica is left alone until its lease expires or is released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from redis.asyncio import Redis

from worker import keys

_ACQUIRE: Final = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] then return {0, owner} end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, tostring(token)}
"""
_RENEW: Final = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_RELEASE: Final = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Lease:
    shard_id: str
    owner: str
    token: str


class LeaseManager:
    """Takes, renews and releases shard leases for one owner (this process)."""

    def __init__(self, redis: Redis, key_prefix: str, owner: str, ttl_seconds: float) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self.owner = owner
        self._ttl_ms = int(ttl_seconds * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def _keys(self, shard_id: str) -> list[str]:
        return [keys.lease(self._prefix, shard_id), keys.fence(self._prefix, shard_id)]

    async def acquire(self, shard_id: str) -> Lease | None:
        """Take the shard's lease with a new fencing token, or None if another owner holds it."""
        ok, value = await self._acquire(keys=self._keys(shard_id), args=[self.owner, self._ttl_ms])
        if not ok:
            return None
        return Lease(shard_id, self.owner, _text(value))

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if it was lost (expired and taken, or released)."""
        return bool(
            await self._renew(
                keys=self._keys(lease.shard_id)[:1], args=[lease.owner, lease.token, self._ttl_ms]
            )
        )

    async def release(self, lease: Lease) -> bool:
        return bool(
            await self._release(
                keys=self._keys(lease.shard_id)[:1], args=[lease.owner, lease.token]
            )
        )

    async def holder(self, shard_id: str) -> str | None:
        owner = await self._redis.hget(keys.lease(self._prefix, shard_id), "owner")  # type: ignore[misc]  # redis-py types sync|async
        return None if owner is None else _text(owner)


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
