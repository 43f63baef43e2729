"""The ``supersim-worker`` command line: one subcommand per job, each in its own module.

Before a command that reads settings runs, unknown ``SUPERSIM_*`` variables are refused
(``worker.handlers.registry.check_environment``): exit 2 naming each one and the closest
valid name. A failure is reported on standard error: as a JSON log line once logging is
configured for JSON, else as one line of text.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Final

import structlog
from botocore.exceptions import ClientError, NoCredentialsError
from redis.exceptions import ConnectionError as RedisConnectionError

from worker import logs
from worker.cli import alerts, decode, dlq, health, replay, run, simulate, status, usage
from worker.errors import ConfigError, WorkerError
from worker.handlers import registry
from worker.settings import split_names

WITHOUT_SETTINGS: Final = frozenset({"decode", "simulate"})
"""Commands that read no ``SUPERSIM_*`` settings (every other command's are checked)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supersim-worker",
        description="Kinesis consumer for Super SIM Connection Events.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {logs.package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (run, status, health, replay, dlq, alerts, usage, decode, simulate):
        command.add_parser(subparsers)
    return parser


def check_environment(args: argparse.Namespace) -> None:
    """Refuse unknown ``SUPERSIM_*`` variables for a command that reads settings (a
    ``--handlers`` flag adds the sections of the handlers it names)."""
    if args.command in WITHOUT_SETTINGS:
        return
    flag = getattr(args, "handlers", None)
    registry.check_environment(handlers=split_names(flag) if isinstance(flag, str) else ())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_environment(args)
        status: int = args.func(args)
    except ConfigError as exc:
        report(str(exc))
        return 2
    except NoCredentialsError:
        report(
            "no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a role)"
        )
        return 2
    except ClientError as exc:
        error = exc.response.get("Error", {})
        report(
            f"Kinesis refused {exc.operation_name}: "
            f"{error.get('Code', 'error')}: {error.get('Message', exc)}"
        )
        return 1
    except RedisConnectionError as exc:
        report(f"cannot reach Redis: {exc}")
        return 1
    except WorkerError as exc:  # an operation stopped part-way, e.g. a redrive by an outage
        report(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    return status


def report(message: str) -> None:
    """Tell why the command failed: a ``command_failed`` log line when logs are JSON (so
    every line a production worker writes is JSON, redacted like the others), else
    ``supersim-worker: message`` (settings that could not be read leave logging as is)."""
    if logs.renders_json():
        structlog.get_logger("worker.cli").error("command_failed", error=message)
    else:
        print(f"supersim-worker: {message}", file=sys.stderr)
