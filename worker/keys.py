"""Redis key layout. Every key of one stream and consumer group shares one Redis Cluster
hash tag, ``{sw:<stream>:<group>}``, so Lua scripts touching several of them stay in one slot.

=====================================  =======  ============================================
key                                    type     holds
=====================================  =======  ============================================
``{sw:S:G}:lease:<shard>``             hash     owner, token (fencing), bound (owner's steal
                                               bound, ms); expires with its TTL
``{sw:S:G}:fence:<shard>``             string   fencing counter, +1 on every lease take
``{sw:S:G}:checkpoints``               hash     shard id -> last handled sequence / SHARD_END
``{sw:S:G}:dlq``                       stream   dead-lettered records with their reasons
``{sw:S:G}:tip:<shard>``               string   present while the shard's reader is at its tip
``{sw:S:G}:steal:<shard>``             hash     thief, until, fresh: another replica asked for
                                               it (void once ``fresh`` passes)
``{sw:S:G}:replicas``                  zset     live replica id -> heartbeat expiry (ms)
``{sw:S:G}:lag``                       hash     shard id -> last MillisBehindLatest seen
=====================================  =======  ============================================

Handlers put their own keys under the same prefix (see their modules).
"""

from __future__ import annotations

from typing import Final

SHARD_END: Final = "SHARD_END"


def prefix(stream: str, group: str) -> str:
    return f"{{sw:{stream}:{group}}}"


def lease(key_prefix: str, shard_id: str) -> str:
    return f"{key_prefix}:lease:{shard_id}"


def fence(key_prefix: str, shard_id: str) -> str:
    return f"{key_prefix}:fence:{shard_id}"


def checkpoints(key_prefix: str) -> str:
    return f"{key_prefix}:checkpoints"


def dead_letters(key_prefix: str) -> str:
    return f"{key_prefix}:dlq"


def tip(key_prefix: str, shard_id: str) -> str:
    return f"{key_prefix}:tip:{shard_id}"


def steal(key_prefix: str, shard_id: str) -> str:
    return f"{key_prefix}:steal:{shard_id}"


def replicas(key_prefix: str) -> str:
    return f"{key_prefix}:replicas"


def lag(key_prefix: str) -> str:
    return f"{key_prefix}:lag"


AT_TIMESTAMP_PREFIX: Final = "AT_TIMESTAMP:"
"""A checkpoint ``AT_TIMESTAMP:<iso>``: a shard started at LATEST before its first record;
a restart resumes from that time instead of a newer LATEST, so nothing in between is lost."""
