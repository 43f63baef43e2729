"""``supersim-worker alerts dead``, ``redrive`` and ``delete``: alerts that could not be
delivered.

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
from datetime import UTC, datetime

import orjson

from worker.consumer.app import command_settings, services
from worker.handlers import registry
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.base import Handler
from worker.settings import Settings


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


def run(args: argparse.Namespace) -> int:
    settings = _with_alert_handlers(command_settings("alert state"))
    if args.alerts_command == "dead":
        return asyncio.run(_dead(settings, args.json))
    if args.alerts_command == "delete":
        return asyncio.run(_delete(settings, args.entries))
    return asyncio.run(_redrive(settings, list(dict.fromkeys(args.entries))))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "alerts", help="list, redrive or delete alerts that could not be delivered"
    )
    commands = parser.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
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
