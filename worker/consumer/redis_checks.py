"""Start-up checks of the Redis server the worker keeps its state in.

``check_access``: the worker can run its Lua scripts on its own keys. Once running, a
refused command (an ACL, a cluster redirection) is treated as an outage and retried
without end, as it may be a passing change; at start-up it is far more likely to be
configuration, so it stops the worker with a message saying what to fix.

Every metering and alert key carries a TTL, so an eviction policy other than
``noeviction`` (``volatile-*`` as well as ``allkeys-*``) lets Redis delete them under memory
pressure: a session's duplicate detection disappears and a replayed window is counted
twice, or a bucket disappears with its usage. With ``noeviction`` a full Redis refuses
writes instead (an OOM error): batches are retried from their checkpoint and nothing is
lost or counted twice.
"""

from __future__ import annotations

from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import AskError, MovedError, NoPermissionError, ResponseError

from worker.errors import ConfigError

SAFE_POLICY: Final = "noeviction"

WHY: Final = (
    "Redis may evict keys with a TTL under memory pressure, and every metering key has one: "
    "an evicted session record lets replayed usage windows be counted twice, an evicted "
    "bucket loses its usage"
)
FIX: Final = (
    "set maxmemory-policy noeviction (on ElastiCache: a parameter group with "
    "maxmemory-policy noeviction)"
)

_log = structlog.get_logger("worker.consumer.redis_checks")

_PROBE: Final = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', 10000)
local seen = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1])
return seen
"""


async def check_access(redis: Redis, key_prefix: str) -> None:
    """Run a script that writes, reads and deletes a key of this stream and group; raise
    ConfigError if Redis refuses it (an ACL without the keys or EVAL, a cluster node that
    does not hold the keys' slot)."""
    probe = f"{key_prefix}:probe"
    try:
        await redis.eval(_PROBE, 1, probe, "1")  # type: ignore[misc]  # redis-py types sync|async
    except (NoPermissionError, MovedError, AskError) as exc:
        raise ConfigError(
            f"Redis refused the worker's script on its keys ({type(exc).__name__}: {exc}). "
            f"The Redis user needs read and write access to keys matching {key_prefix}* and "
            "the EVAL/EVALSHA/SCRIPT commands; a Redis Cluster endpoint is not supported "
            "(use the primary of a non-clustered deployment)"
        ) from None


async def eviction_policy(redis: Redis) -> str | None:
    """The server's ``maxmemory-policy``, or None if it does not tell us.

    ``CONFIG GET`` first; managed Redis often disables CONFIG, so then the
    ``maxmemory_policy`` field of ``INFO memory``. A refused command (unknown, renamed, or
    NOPERM for an ACL user) gives None; connection errors and timeouts are raised.
    """
    try:
        config = await redis.config_get("maxmemory-policy")
    except ResponseError:
        pass
    else:
        policy = config.get("maxmemory-policy")
        if policy:
            return str(policy)
    try:
        info = await redis.info("memory")
    except ResponseError:
        return None
    policy = info.get("maxmemory_policy")
    return str(policy) if policy else None


async def check_eviction_policy(redis: Redis, *, require_noeviction: bool = False) -> str | None:
    """Warn (or, with ``require_noeviction``, raise ConfigError) unless the policy is noeviction.

    A policy that cannot be read is logged as a warning and never stops start-up. Returns
    the policy read, or None.
    """
    policy = await eviction_policy(redis)
    if policy is None:
        _log.warning(
            "redis_eviction_policy_unchecked",
            reason="CONFIG GET and INFO memory were refused; the policy could not be checked",
            required=SAFE_POLICY,
            why=WHY,
            fix=FIX,
        )
    elif policy != SAFE_POLICY:
        if require_noeviction:
            raise ConfigError(
                f"Redis maxmemory-policy is {policy}, and SUPERSIM_REQUIRE_NOEVICTION is set: "
                f"{WHY}; {FIX}"
            )
        _log.warning(
            "redis_eviction_policy_unsafe",
            policy=policy,
            required=SAFE_POLICY,
            why=WHY,
            fix=FIX,
        )
    return policy
