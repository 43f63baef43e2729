"""``supersim-worker dlq list``, ``redrive`` and ``delete``: inspect, re-handle or discard
dead letters.

Redrive re-runs, for each entry, the handler that failed on it (named on the entry), built
from ``SUPERSIM_HANDLERS`` or else from the built-in handlers, whatever else is
configured: running other handlers would "succeed" and delete the entry unhandled.
Records that failed to decode never reached any handler: they are redriven through the
handlers ``SUPERSIM_HANDLERS`` names, which must then be set as the worker has it. Entries
that now succeed are removed; entries that still fail stay, each failure logged
(``dead_letter_redrive_failed``) and printed. A Redis or network outage stops the redrive
instead of counting entries as failing. Handlers are idempotent, so redriving twice is safe.
Delete removes entries by id (as ``list`` shows them): the store is never trimmed, so
this is the one way a record leaves it without being handled.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from worker.cli.commands import COMMANDS
from worker.errors import ConfigError, WorkerError

if TYPE_CHECKING:
    from worker.consumer.deadletter import DeadLetter, DeadLetterStore
    from worker.handlers.base import Handler
    from worker.settings import Settings

# Imports are local to the action that needs them: `list` and `delete` read the store with
# Redis alone, and only `redrive` loads the decoder, the handlers and the consumer's
# services (pydantic models, every handler's dependencies).

ENTRY_ID: Final = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
"""A Redis stream entry id, as the dead-letter store's entries have."""


class RedriveAborted(WorkerError):
    """Redis or the network failed during a redrive: the entries not yet tried stay."""


@dataclass(slots=True)
class RedriveFailure:
    entry_id: str
    handler: str
    error: str


@dataclass(slots=True)
class RedriveResult:
    redriven: int = 0
    still_failing: int = 0
    skipped: int = 0
    failures: list[RedriveFailure] = field(default_factory=list)


HandlerFor = Callable[[str], "Handler | None"]
"""The handler of a given name for redriving its entries, or None if it is not available."""


async def redrive(
    store: DeadLetterStore,
    handler_for: HandlerFor,
    decode_handlers: Sequence[Handler] | None,
    limit: int,
) -> RedriveResult:
    """Redrive at most ``limit`` entries, oldest first. ``decode_handlers`` are those that
    records which failed to decode go through; None leaves those entries alone."""
    import structlog

    result = RedriveResult()
    log = structlog.get_logger("worker.cli.dlq")
    cursor = "-"
    seen = 0
    while seen < limit:
        letters = await store.list(count=min(100, limit - seen), start=cursor)
        if not letters:
            break
        seen += len(letters)
        cursor = "(" + letters[-1].entry_id
        done: list[str] = []
        try:
            for letter in letters:
                outcome = await _redrive_one(letter, handler_for, decode_handlers)
                if isinstance(outcome, RedriveFailure):
                    result.still_failing += 1
                    result.failures.append(outcome)
                    log.warning(
                        "dead_letter_redrive_failed",
                        entry_id=letter.entry_id,
                        shard_id=letter.shard_id,
                        sequence_number=letter.sequence_number,
                        handler=outcome.handler,
                        error=outcome.error,
                    )
                else:
                    done.append(letter.entry_id)
                    result.redriven += outcome
                    result.skipped += 1 - outcome
        finally:
            await store.delete(done)
    return result


async def _redrive_one(
    letter: DeadLetter, handler_for: HandlerFor, decode_handlers: Sequence[Handler] | None
) -> int | RedriveFailure:
    """1 if handled, 0 if it decodes to an event handlers skip, else why it still fails."""
    from worker.consumer.deadletter import DECODE
    from worker.errors import DecodeError, is_infrastructure_failure
    from worker.events.decode import decode
    from worker.events.records import ConnectionEvent, KinesisMeta
    from worker.handlers.base import Batch

    meta = KinesisMeta(
        letter.shard_id, letter.sequence_number, letter.partition_key, letter.arrival
    )

    def failure(handler: str, error: str) -> RedriveFailure:
        return RedriveFailure(letter.entry_id, handler, error)

    try:
        event = decode(letter.raw, meta)
    except DecodeError as exc:
        return failure(DECODE, f"DecodeError: {exc.reason}")
    if not isinstance(event, ConnectionEvent):
        return 0
    if letter.handler == DECODE:
        if decode_handlers is None:
            return failure(
                DECODE,
                "decodes now; set SUPERSIM_HANDLERS as the worker has it to redrive it "
                "through those handlers",
            )
        handlers = list(decode_handlers)
    else:
        found = handler_for(letter.handler)
        if found is None:
            return failure(
                letter.handler,
                f"handler {letter.handler!r} is not available here: name it in "
                "SUPERSIM_HANDLERS (as the worker does) to redrive its entries",
            )
        handlers = [found]
    batch = Batch("", [event])  # a late event: no shard's progress (its meta names the shard)
    for handler in handlers:
        try:
            await handler.handle(batch)
        except Exception as exc:
            if is_infrastructure_failure(exc):
                raise RedriveAborted(
                    f"dlq redrive stopped: {type(exc).__name__}: {exc} "
                    "(the entries not yet redriven stay; run it again later)"
                ) from exc
            return failure(handler.name, f"{type(exc).__name__}: {exc}")
    return 1


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[DeadLetterStore]:
    """The dead-letter store of the stream and group ``settings`` name, over a Redis
    connection of its own (checked with a PING), closed on exit."""
    from redis.asyncio import Redis

    from worker import keys
    from worker.consumer.deadletter import DeadLetterStore

    redis = Redis.from_url(settings.redis_dsn, socket_timeout=10)
    try:
        await redis.ping()  # type: ignore[misc]  # redis-py types sync|async
        key = keys.dead_letters(keys.prefix(settings.stream_name, settings.consumer_group))
        yield DeadLetterStore(redis, key, settings.dlq_maxlen)
    finally:
        await redis.aclose()


async def _list(
    settings: Settings, limit: int, as_json: bool, after: str | None, newest: bool
) -> int:
    import orjson

    from worker.logs import scrub_text

    if after is not None and not ENTRY_ID.fullmatch(after):
        raise ConfigError(
            f"dlq list --after: not an entry id: {after} (ids look like 1700000000000-0)"
        )
    async with _store(settings) as store:
        start = "-" if after is None else "(" + after
        letters = await store.list(count=limit + 1, start=start, newest=newest)
        total = await store.length()
    more, letters = len(letters) > limit, letters[:limit]
    shown = scrub_text if settings.redact_pii else str
    for letter in letters:
        row = {
            "id": letter.entry_id,
            "shard_id": letter.shard_id,
            "sequence_number": letter.sequence_number,
            "arrival": letter.arrival.isoformat() if letter.arrival else None,
            "handler": letter.handler,
            "reason": letter.reason,  # never quotes values (decode's nor the pipeline's)
            "exception": shown(letter.exception) if letter.exception else letter.exception,
            "bytes": len(letter.raw),
        }
        if as_json:
            print(orjson.dumps(row).decode())
        else:
            detail = f": {row['exception']}" if letter.exception else ""
            print(
                f"{letter.entry_id}  {letter.shard_id}  {letter.sequence_number}  "
                f"[{letter.handler}] {row['reason']}{detail}"
            )
    if not as_json:
        following = f" (next: --after {letters[-1].entry_id})" if more and not newest else ""
        print(f"{len(letters)} shown of {total} dead-lettered records{following}")
    return 0


async def _redrive(settings: Settings, limit: int) -> int:
    from worker.consumer.app import close_handler, services
    from worker.handlers import registry
    from worker.logs import scrub_text

    explicit = "handlers" in settings.model_fields_set
    built: dict[str, Handler] = {}
    async with services(settings) as svc:
        configured = {handler.name: handler for handler in svc.handlers}

        def handler_for(name: str) -> Handler | None:
            if name in configured:
                return configured[name]
            if name not in built:
                if name not in registry.available():
                    return None
                built[name] = registry.build([name], svc.redis, svc.key_prefix)[0]
            return built[name]

        try:
            result = await redrive(
                svc.dead_letters, handler_for, svc.handlers if explicit else None, limit
            )
        finally:
            await asyncio.gather(*(close_handler(handler) for handler in built.values()))
    for failed in result.failures:
        error = scrub_text(failed.error) if settings.redact_pii else failed.error
        print(f"{failed.entry_id}  still fails [{failed.handler}] {error}")
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
    async with _store(settings) as store:
        deleted = await store.delete(wanted)
    print(f"deleted {deleted} of {len(wanted)} entries")
    return 0 if deleted == len(wanted) else 1


def command_settings() -> Settings:
    """The settings, with logging configured; the stream name is required (the store is
    per stream and consumer group)."""
    from worker import logs
    from worker.settings import load_settings

    settings = load_settings()
    if not settings.stream_name:
        raise ConfigError("SUPERSIM_STREAM_NAME: required (the dead-letter store is per stream)")
    logs.configure(settings.log_format.value, settings.log_level.value, settings.redact_pii)
    return settings


def run(args: argparse.Namespace) -> int:
    settings = command_settings()
    if args.dlq_command == "list":
        return asyncio.run(_list(settings, args.limit, args.json, args.after, args.newest))
    if args.dlq_command == "delete":
        return asyncio.run(_delete(settings, args.entry_ids))
    return asyncio.run(_redrive(settings, args.limit))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("dlq", help=COMMANDS["dlq"].help)
    commands = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = commands.add_parser("list", help="list dead-lettered records with their reasons")
    listing.add_argument(
        "--limit", type=_positive, default=100, help="at most this many (default 100)"
    )
    order = listing.add_mutually_exclusive_group()
    order.add_argument("--after", metavar="ID", help="entries after this id (the next page)")
    order.add_argument("--newest", action="store_true", help="the newest entries, newest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(func=run)
    again = commands.add_parser("redrive", help="re-run the handlers; remove what now succeeds")
    again.add_argument(
        "--limit", type=_positive, default=10_000, help="at most this many (default 10000)"
    )
    again.set_defaults(func=run)
    discard = commands.add_parser("delete", help="remove entries by id, without handling them")
    discard.add_argument("entry_ids", nargs="+", metavar="ID", help="entry ids from `dlq list`")
    discard.set_defaults(func=run)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
