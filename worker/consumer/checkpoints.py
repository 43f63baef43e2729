"""Fenced checkpoints: the last sequence number of a shard whose handling is complete.

A write is one Lua script that checks the writer still holds the shard's lease with the
same fencing token, and that the stored checkpoint is still the one this writer last saw
or wrote, then stores the new one (and extends the lease). A stale owner's write is
refused with ``LeaseLost``, and that reader stops. A checkpoint that is not what the
writer expects means Redis lost acknowledged writes (a failover to a replica that had not
received them) and, with them, possibly handlers' effects: the write is refused with
``CheckpointMoved`` and the reader restarts from the stored checkpoint, so those records
are handled again rather than skipped. Checkpoints are written only after every handler
has returned for the batch (at-least-once delivery).
"""

from __future__ import annotations

from typing import Final

from redis.asyncio import Redis

from worker import keys
from worker.consumer.leases import Lease
from worker.errors import RetriableError, WorkerError

_WRITE: Final = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'token')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
if (redis.call('HGET', KEYS[2], ARGV[3]) or '') ~= ARGV[6] then return -1 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""


class LeaseLost(WorkerError):
    """This worker no longer owns the shard: another owner took the lease."""


class CheckpointMoved(RetriableError):
    """The stored checkpoint is not the one this reader last saw or wrote: Redis lost
    writes. The reader restarts from what is stored."""


class Checkpoints:
    def __init__(self, redis: Redis, key_prefix: str, lease_ttl_seconds: float) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._key = keys.checkpoints(key_prefix)
        self._ttl_ms = int(lease_ttl_seconds * 1000)
        self._write = redis.register_script(_WRITE)

    async def get(self, shard_id: str) -> str | None:
        value = await self._redis.hget(self._key, shard_id)  # type: ignore[misc]  # redis-py types sync|async
        return None if value is None else value.decode() if isinstance(value, bytes) else value

    async def all(self) -> dict[str, str]:
        raw = await self._redis.hgetall(self._key)  # type: ignore[misc]  # redis-py types sync|async
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }

    async def mark_tip(self, shard_id: str, at_tip: bool, ttl_seconds: float) -> None:
        """Record whether the shard's reader is at its tip, for replicas that do not read it
        (``all_caught_up`` across replicas); the mark expires unless renewed."""
        key = keys.tip(self._prefix, shard_id)
        if at_tip:
            await self._redis.set(key, b"1", px=int(ttl_seconds * 1000))
        else:
            await self._redis.delete(key)

    async def at_tip(self, shard_ids: list[str]) -> set[str]:
        """Which of these shards some reader marked as at its tip."""
        if not shard_ids:
            return set()
        found = await self._redis.mget([keys.tip(self._prefix, sid) for sid in shard_ids])
        return {sid for sid, value in zip(shard_ids, found, strict=True) if value is not None}

    async def write(self, lease: Lease, sequence: str, *, previous: str | None) -> None:
        """Store ``sequence`` (or ``keys.SHARD_END``) for the lease's shard.

        ``previous`` is the checkpoint the caller knows to be stored (None for none): the
        one read when it took the lease, then each one it wrote. Raises ``LeaseLost`` if the
        lease is no longer this writer's, ``CheckpointMoved`` if the checkpoint changed.
        """
        status = await self._write(
            keys=[keys.lease(self._prefix, lease.shard_id), self._key],
            args=[lease.owner, lease.token, lease.shard_id, sequence, self._ttl_ms, previous or ""],
        )
        if status == 0:
            raise LeaseLost(f"shard {lease.shard_id}: lease token {lease.token} is no longer ours")
        if status == -1:
            raise CheckpointMoved(
                f"shard {lease.shard_id}: the stored checkpoint is not the one last written "
                "(Redis lost writes, e.g. in a failover): re-reading from the stored one"
            )
