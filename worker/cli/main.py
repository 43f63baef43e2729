"""The ``supersim-worker`` command line: one subcommand per job, each in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from botocore.exceptions import ClientError, NoCredentialsError
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.cli import alerts, decode, dlq, replay, run, simulate, usage
from worker.errors import ConfigError, WorkerError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supersim-worker",
        description="Kinesis consumer for Super SIM Connection Events.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (run, replay, dlq, alerts, usage, decode, simulate):
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(f"supersim-worker: {exc}", file=sys.stderr)
        return 2
    except NoCredentialsError:
        print(
            "supersim-worker: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a role)",
            file=sys.stderr,
        )
        return 2
    except ClientError as exc:
        error = exc.response.get("Error", {})
        print(
            f"supersim-worker: Kinesis refused {exc.operation_name}: "
            f"{error.get('Code', 'error')}: {error.get('Message', exc)}",
            file=sys.stderr,
        )
        return 1
    except RedisConnectionError as exc:
        print(f"supersim-worker: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except WorkerError as exc:  # an operation stopped part-way, e.g. a redrive by an outage
        print(f"supersim-worker: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
