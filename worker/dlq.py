"""``supersim-worker dlq list``, ``redrive`` and ``delete``: inspect, re-handle or discard
dead letters.

Redrive re-runs the currently configured handlers on each dead-lettered record and
removes the entries that now succeed; entries that still fail (or still do not decode)
stay, with the count reported. Handlers are idempotent, so redriving twice is safe.
Delete removes entries by id (as ``list`` shows them): the store is never trimmed, so
this is the one way a record leaves it without being handled.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass
from typing import Final

import orjson

from worker.app import command_settings, services
from worker.deadletter import DeadLetter, DeadLetterStore
from worker.decode import decode
from worker.errors import ConfigError, DecodeError
from worker.handlers.base import Batch, Handler
from worker.records import ConnectionEvent, KinesisMeta
from worker.settings import Settings

ENTRY_ID: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
"""A Redis stream entry id, as the dead-letter store's entries have."""


@dataclass(slots=True)
class RedriveResult:
    redriven: int = 0
    still_failing: int = 0
    skipped: int = 0


async def redrive(store: DeadLetterStore, handlers: list[Handler], limit: int) -> RedriveResult:
    result = RedriveResult()
    cursor = "-"
    seen = 0
    while seen < limit:
        letters = await store.list(count=min(100, limit - seen), start=cursor)
        if not letters:
            break
        seen += len(letters)
        cursor = "(" + letters[-1].entry_id
        done: list[str] = []
        for letter in letters:
            outcome = await _redrive_one(letter, handlers)
            if outcome is None:
                result.still_failing += 1
            else:
                done.append(letter.entry_id)
                result.redriven += outcome
                result.skipped += 1 - outcome
        await store.delete(done)
    return result


async def _redrive_one(letter: DeadLetter, handlers: list[Handler]) -> int | None:
    """1 if handled, 0 if it decodes to an event handlers skip, None if it still fails."""
    meta = KinesisMeta(
        letter.shard_id, letter.sequence_number, letter.partition_key, letter.arrival
    )
    try:
        event = decode(letter.raw, meta)
    except DecodeError:
        return None
    if not isinstance(event, ConnectionEvent):
        return 0
    batch = Batch(letter.shard_id, [event])
    for handler in handlers:
        try:
            await handler.handle(batch)
        except Exception:
            return None
    return 1


async def _list(settings: Settings, limit: int, as_json: bool) -> int:
    async with services(settings) as svc:
        letters = await svc.dead_letters.list(count=limit)
        total = await svc.dead_letters.length()
    for letter in letters:
        row = {
            "id": letter.entry_id,
            "shard_id": letter.shard_id,
            "sequence_number": letter.sequence_number,
            "arrival": letter.arrival.isoformat() if letter.arrival else None,
            "handler": letter.handler,
            "reason": letter.reason,
            "exception": letter.exception,
            "bytes": len(letter.raw),
        }
        if as_json:
            print(orjson.dumps(row).decode())
        else:
            print(
                f"{letter.entry_id}  {letter.shard_id}  {letter.sequence_number}  "
                f"[{letter.handler}] {letter.reason}"
            )
    if not as_json:
        print(f"{len(letters)} shown of {total} dead-lettered records")
    return 0


async def _redrive(settings: Settings, limit: int) -> int:
    async with services(settings) as svc:
        result = await redrive(svc.dead_letters, svc.handlers, limit)
    print(
        f"redriven {result.redriven}, skipped (not connection events) {result.skipped}, "
        f"still failing {result.still_failing}"
    )
    return 1 if result.still_failing else 0


async def _delete(settings: Settings, entry_ids: list[str]) -> int:
    wanted = list(dict.fromkeys(entry_ids))
    malformed = [entry_id for entry_id in wanted if not ENTRY_ID.fullmatch(entry_id)]
    if malformed:
        raise ConfigError(
            f"dlq delete: not entry ids: {', '.join(malformed)} "
            "(ids look like 1700000000000-0, as `dlq list` shows them)"
        )
    async with services(settings) as svc:
        deleted = await svc.dead_letters.delete(wanted)
    print(f"deleted {deleted} of {len(wanted)} entries")
    return 0 if deleted == len(wanted) else 1


def run(args: argparse.Namespace) -> int:
    settings = command_settings("the dead-letter store")
    if args.dlq_command == "list":
        return asyncio.run(_list(settings, args.limit, args.json))
    if args.dlq_command == "delete":
        return asyncio.run(_delete(settings, args.entry_ids))
    return asyncio.run(_redrive(settings, args.limit))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "dlq", help="inspect, redrive or delete entries of the dead-letter store"
    )
    commands = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = commands.add_parser("list", help="list dead-lettered records with their reasons")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=run)
    again = commands.add_parser("redrive", help="re-run the handlers; remove what now succeeds")
    again.add_argument(
        "--limit", type=int, default=10_000, help="at most this many (default 10000)"
    )
    again.set_defaults(func=run)
    discard = commands.add_parser("delete", help="remove entries by id, without handling them")
    discard.add_argument("entry_ids", nargs="+", metavar="ID", help="entry ids from `dlq list`")
    discard.set_defaults(func=run)
