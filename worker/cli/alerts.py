"""``supersim-worker alerts list``: the episodes open now and the recent alerts;
``alerts dead``, ``redrive`` and ``delete``: alerts that could not be delivered.

``list`` reads what the alert handlers keep: each handler's open episodes (its
``:active`` hash and their state, see ``episodes.lua``), shown as their opening alert with
the counts known so far, and the newest entries of the alerts stream the ``stream`` sink
writes (``{prefix}:alerts``), newest first; a table, or one JSON object per line.

An alert delivery is given up on when a sink answers that repeating cannot help (a
webhook's 4xx), when it stays undeliverable past ``SUPERSIM_ALERTS__WEBHOOK__MAX_AGE``, or
when its sink was switched off. It is then kept, with the reason, in its handler's dead
store (see ``worker.handlers.alerts.outbox``). ``dead`` lists those entries, ``redrive`` puts them
back in the outbox, due at once (a running worker delivers them on its next round, with
the same idempotency keys), and ``delete`` discards them for good. They look at the state
of every alert handler that can be chosen (the built-in rules and any package's plugin
marked ``alerts=True``), whatever ``SUPERSIM_HANDLERS`` names.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from worker.cli.commands import COMMANDS
from worker.consumer.app import command_settings, services
from worker.handlers import registry
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.model import AlertKind
from worker.handlers.base import Handler
from worker.settings import Settings

RECENT_LIMIT = 20
"""Recent alerts listed by default."""
_PAGE = 500


def _with_alert_handlers(settings: Settings) -> Settings:
    return settings.model_copy(update={"handlers": tuple(registry.alert_handler_names())})


def _alert_handlers(handlers: list[Handler]) -> list[AlertHandler]:
    return [handler for handler in handlers if isinstance(handler, AlertHandler)]


async def _dead(settings: Settings, as_json: bool) -> int:
    total = 0
    async with services(settings) as svc:
        for handler in _alert_handlers(list(svc.handlers)):
            for entry, letter in sorted((await handler.outbox.dead()).items()):
                total += 1
                sink, kind, subject, key, status = (entry.split("|") + [""] * 5)[:5]
                at = datetime.fromtimestamp(int(letter.get("at", 0)) / 1000, UTC).isoformat()
                row = {
                    "handler": handler.name,
                    "entry": entry,
                    "sink": sink,
                    "kind": kind,
                    "subject": subject,
                    "episode": key,
                    "status": status,
                    "reason": letter.get("reason"),
                    "at": at,
                }
                if as_json:
                    print(orjson.dumps(row).decode())
                else:
                    print(f"{entry}  [{handler.name}] {letter.get('reason')}  ({at})")
    if not as_json:
        print(f"{total} undeliverable alerts")
    return 0


async def _redrive(settings: Settings, entries: list[str]) -> int:
    moved = 0
    async with services(settings) as svc:
        for handler in _alert_handlers(list(svc.handlers)):
            wanted = entries or list(await handler.outbox.dead())
            moved += await handler.outbox.requeue(wanted, round(time.time() * 1000))
    print(f"requeued {moved} alerts; a running worker delivers them on its next round")
    return 1 if entries and moved < len(set(entries)) else 0


async def _delete(settings: Settings, entries: list[str]) -> int:
    wanted = list(dict.fromkeys(entries))
    deleted = 0
    async with services(settings) as svc:
        for handler in _alert_handlers(list(svc.handlers)):
            deleted += await handler.outbox.delete_dead(wanted)
    print(f"deleted {deleted} of {len(wanted)} entries")
    return 0 if deleted == len(wanted) else 1


async def _list(settings: Settings, args: argparse.Namespace) -> int:
    async with services(settings) as svc:
        handlers = _alert_handlers(list(svc.handlers))
        open_rows = [
            {"section": "open", "handler": handler.name, **alert.model_dump(mode="json")}
            for handler in handlers
            for alert in await handler.open_alerts()
        ]
        open_rows = [row for row in open_rows if _wanted(row, args.kind, args.fleet)]
        recent: list[dict[str, Any]] = []
        if not args.open:
            streams = sorted({handler.outbox.stream_key for handler in handlers})
            recent = await _recent(svc.redis, streams, args.kind, args.fleet, args.limit)
        stream_sink = any("stream" in handler.sinks for handler in handlers)
    if args.json:
        for row in [*open_rows, *recent]:
            print(orjson.dumps(row).decode())
        return 0
    print(f"open episodes: {len(open_rows)}")
    if open_rows:
        _table(
            ["OPENED", "KIND", "SUBJECT", "FLEET", "COUNT", "LAST EVENT", "ID"],
            [
                [
                    _when(row["opened_at"]),
                    row["kind"],
                    row["subject"],
                    row["fleet_sid"] or "-",
                    str(row["count"]),
                    _when(row["last_seen"]),
                    row["id"],
                ]
                for row in open_rows
            ],
        )
    if args.open:
        return 0
    print(f"\nrecent alerts: {len(recent)} (newest first, at most {args.limit})")
    if not stream_sink:
        print("(recent alerts are kept by the stream sink: SUPERSIM_ALERTS__SINKS=log,stream)")
    if recent:
        _table(
            ["SENT", "STATUS", "KIND", "SUBJECT", "FLEET", "OPENED", "RESOLVED", "ID"],
            [
                [
                    _when(row["sent_at"]),
                    row.get("status", "?"),
                    row.get("kind", "?"),
                    row.get("subject", "?"),
                    row.get("fleet_sid") or "-",
                    _when(row.get("opened_at")),
                    _when(row.get("resolved_at")),
                    row.get("id", "?"),
                ]
                for row in recent
            ],
        )
    return 0


def _wanted(alert: dict[str, Any], kind: str | None, fleet: str | None) -> bool:
    return (kind is None or alert.get("kind") == kind) and (
        fleet is None or alert.get("fleet_sid") == fleet
    )


async def _recent(
    redis: Redis, streams: Sequence[str], kind: str | None, fleet: str | None, limit: int
) -> list[dict[str, Any]]:
    """The newest ``limit`` alerts of the alerts streams that pass the filters, newest
    first, each with its stream entry id and when it was appended (``sent_at``)."""
    found: list[tuple[tuple[int, int], dict[str, Any]]] = []
    for stream in streams:
        matched, upper = 0, "+"
        while matched < limit:
            page = await redis.xrevrange(stream, max=upper, min="-", count=_PAGE)
            for raw_id, fields in page:
                entry = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                alert = orjson.loads(fields[b"alert"])
                if not _wanted(alert, kind, fleet):
                    continue
                ms, _, seq = entry.partition("-")
                sent_at = datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat()
                row = {"section": "recent", "stream_id": entry, "sent_at": sent_at, **alert}
                found.append(((int(ms), int(seq or 0)), row))
                matched += 1
                if matched == limit:
                    break
            if len(page) < _PAGE:
                break
            upper = f"({entry}"
    found.sort(key=lambda item: item[0], reverse=True)
    return [row for _, row in found[:limit]]


def _when(value: str | None) -> str:
    """An ISO time as ``2024-03-01 12:00:00Z``, ``-`` for none."""
    if not value:
        return "-"
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def run(args: argparse.Namespace) -> int:
    settings = _with_alert_handlers(command_settings("alert state"))
    if args.alerts_command == "list":
        return asyncio.run(_list(settings, args))
    if args.alerts_command == "dead":
        return asyncio.run(_dead(settings, args.json))
    if args.alerts_command == "delete":
        return asyncio.run(_delete(settings, args.entries))
    return asyncio.run(_redrive(settings, list(dict.fromkeys(args.entries))))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "alerts",
        help=COMMANDS["alerts"].help,
    )
    commands = parser.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    recent = commands.add_parser(
        "list",
        help="the episodes open now and the recent alerts",
        description="The episodes open now (as their opening alert, with the counts so far) "
        "and the newest alerts of the alerts stream (kept by the stream sink), newest first.",
    )
    recent.add_argument("--open", action="store_true", help="only the open episodes")
    kinds = [kind.value for kind in AlertKind]
    recent.add_argument(
        "--kind", choices=kinds, metavar="KIND", help=f"one kind: {', '.join(kinds)}"
    )
    recent.add_argument("--fleet", metavar="SID", help="one fleet (HF...)")
    recent.add_argument(
        "--limit",
        type=_positive,
        default=RECENT_LIMIT,
        help=f"recent alerts to list (default {RECENT_LIMIT})",
    )
    recent.add_argument("--json", action="store_true", help="one JSON object per line")
    recent.set_defaults(func=run)
    listing = commands.add_parser("dead", help="list undeliverable alerts with their reasons")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=run)
    again = commands.add_parser(
        "redrive", help="put undeliverable alerts back in the outbox (all, or those named)"
    )
    again.add_argument("entries", nargs="*", metavar="ENTRY", help="entries from `alerts dead`")
    again.set_defaults(func=run)
    discard = commands.add_parser("delete", help="discard undeliverable alerts for good")
    discard.add_argument("entries", nargs="+", metavar="ENTRY", help="entries from `alerts dead`")
    discard.set_defaults(func=run)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number
