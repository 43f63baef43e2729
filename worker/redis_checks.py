"""Start-up checks of the Redis server the worker keeps its state in.

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
from redis.exceptions import ResponseError

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

_log = structlog.get_logger("worker.redis_checks")


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
