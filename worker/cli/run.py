"""``supersim-worker run``: the long-running consumer (and its backfill modes)."""

from __future__ import annotations

import argparse
from typing import Any

from worker import logs
from worker.cli.commands import COMMANDS
from worker.cli.runner import LAST_TICK_INCOMPLETE, run_until_done
from worker.consumer.app import run_worker, tune_gc
from worker.errors import ConfigError
from worker.settings import load_settings, utc_timestamp


def run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.stream:
        overrides["stream_name"] = args.stream
    if args.handlers:
        overrides["handlers"] = args.handlers
    settings = load_settings(**overrides)
    if not settings.stream_name:
        raise ConfigError("SUPERSIM_STREAM_NAME: required: the Kinesis stream to consume")
    if args.from_start and args.at_timestamp:
        raise ConfigError("--from-start and --at-timestamp are alternatives: give one")
    at = utc_timestamp(args.at_timestamp) if args.at_timestamp else None
    logs.configure(settings.log_format.value, settings.log_level.value, settings.redact_pii)
    tune_gc()
    summary = run_until_done(
        run_worker(
            settings,
            from_start=args.from_start,
            at_timestamp=at,
            until_caught_up=args.until_caught_up,
        )
    )
    if args.until_caught_up and not summary.caught_up:
        return 1
    if summary.last_tick_incomplete:
        return LAST_TICK_INCOMPLETE
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "run",
        help=COMMANDS["run"].help,
        description="Consume every shard of the stream until SIGTERM/SIGINT.",
    )
    parser.add_argument("--stream", help="stream name (overrides SUPERSIM_STREAM_NAME)")
    parser.add_argument("--handlers", help="comma-separated handlers (overrides SUPERSIM_HANDLERS)")
    parser.add_argument(
        "--from-start",
        action="store_true",
        help="backfill: ignore checkpoints, start every shard at TRIM_HORIZON, then go on live",
    )
    parser.add_argument(
        "--at-timestamp",
        metavar="ISO",
        help="backfill from this RFC 3339 time (ignores checkpoints), then go on live",
    )
    parser.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once every shard is at its tip (for a batch job); 3 if the last tick "
        "of its handlers left work undone (alerts not delivered)",
    )
    parser.set_defaults(func=run)
