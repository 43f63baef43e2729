"""``supersim-worker status``: who reads which shard, how far behind, and which replicas live.

Per shard: its owner (the replica holding the lease), the fencing token, when the lease
expires, the checkpoint, the last ``MillisBehindLatest`` its reader reported (recorded
with each lease renewal), a standing steal request, and its place in the shard graph
(open, closed, parents, ended). Then the live replicas with their lease counts, the age
of their last heartbeat and when it expires. A heartbeat stores its expiry (Redis time),
so its age assumes the replicas run with this command's ``SUPERSIM_LEASE_TTL``; the
expiry is exact whatever the settings. A table by default; ``--format json`` prints one
object with ``shards`` and ``replicas`` for scripts and checks.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio import Redis

from worker import keys
from worker.cli.commands import COMMANDS
from worker.consumer import kinesis
from worker.consumer.app import command_settings, redis_client
from worker.consumer.checkpoints import Checkpoints
from worker.consumer.leases import LeaseManager
from worker.settings import Settings


async def collect(settings: Settings) -> dict[str, Any]:
    """The status as one JSON-ready object (``shards``, ``replicas``)."""
    prefix = keys.prefix(settings.stream_name, settings.consumer_group)
    redis: Redis = redis_client(settings)
    try:
        async with kinesis.client(settings) as client:
            shards = await kinesis.list_shards(client, settings.stream_name)
        reader = LeaseManager(redis, prefix, owner="", ttl_seconds=settings.lease_ttl)
        ids = [shard.shard_id for shard in shards]
        leases = await reader.snapshot(ids)
        replicas = await reader.heartbeat(alive=False)
        checkpoints = await Checkpoints(redis, prefix, settings.lease_ttl).all()
        raw_lag = await redis.hgetall(keys.lag(prefix))  # type: ignore[misc]
    finally:
        await redis.aclose()
    lag = {_text(k): int(_text(v)) for k, v in raw_lag.items()}
    children: dict[str, list[str]] = {}
    for shard in shards:
        for parent in shard.parents:
            children.setdefault(parent, []).append(shard.shard_id)
    rows: list[dict[str, Any]] = []
    for shard in shards:
        sid = shard.shard_id
        lease = leases[sid]
        checkpoint = checkpoints.get(sid)
        rows.append(
            {
                "shard_id": sid,
                "owner": lease.owner,
                "token": lease.token,
                "lease_expires_in_s": None
                if lease.expires_in_ms is None
                else round(lease.expires_in_ms / 1000, 1),
                "checkpoint": checkpoint,
                "millis_behind": lag.get(sid),
                "steal_requested_by": lease.thief,
                "state": "ended"
                if checkpoint == keys.SHARD_END
                else ("closed" if shard.ending_sequence else "open"),
                "parents": list(shard.parents),
                "children": children.get(sid, []),
            }
        )
    counts: dict[str, int] = {}
    for row in rows:
        if row["owner"]:
            counts[row["owner"]] = counts.get(row["owner"], 0) + 1
    live = [
        {
            "id": replica,
            "leases": counts.get(replica, 0),
            "heartbeat_age_s": round(
                max(0.0, (replicas.now_ms - (expiry - reader.ttl_ms)) / 1000), 1
            ),
            "heartbeat_expires_in_s": round(max(0, expiry - replicas.now_ms) / 1000, 1),
        }
        for replica, expiry in sorted(replicas.expiry_ms.items())
    ]
    return {
        "stream": settings.stream_name,
        "group": settings.consumer_group,
        "shards": rows,
        "replicas": live,
    }


def render(status: dict[str, Any]) -> str:
    """The status as two plain-text tables."""
    lines = [f"stream {status['stream']}, consumer group {status['group']}", ""]
    head = ("shard", "state", "owner", "token", "expires", "checkpoint", "behind ms", "steal")
    table = [head]
    for row in status["shards"]:
        checkpoint = row["checkpoint"] or "-"
        table.append(
            (
                row["shard_id"],
                row["state"] + (f" (parents {','.join(row['parents'])})" if row["parents"] else ""),
                row["owner"] or "-",
                row["token"] or "-",
                "-" if row["lease_expires_in_s"] is None else f"{row['lease_expires_in_s']}s",
                checkpoint if len(checkpoint) <= 20 else "…" + checkpoint[-19:],
                "-" if row["millis_behind"] is None else str(row["millis_behind"]),
                row["steal_requested_by"] or "-",
            )
        )
    lines += _table(table)
    lines += ["", f"{len(status['replicas'])} live replica(s)"]
    replicas = [("replica", "leases", "heartbeat age", "expires in")]
    replicas += [
        (r["id"], str(r["leases"]), f"{r['heartbeat_age_s']}s", f"{r['heartbeat_expires_in_s']}s")
        for r in status["replicas"]
    ]
    lines += _table(replicas)
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def run(args: argparse.Namespace) -> int:
    settings = command_settings("status")
    status = asyncio.run(collect(settings))
    if args.format == "json":
        print(orjson.dumps(status).decode())
    else:
        print(render(status))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help=COMMANDS["status"].help,
        description="Per shard: owner, fencing token, lease expiry, checkpoint, last "
        "MillisBehindLatest, parents and children; then the live replicas.",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.set_defaults(func=run)
