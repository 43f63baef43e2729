"""The ``supersim-worker`` command line: one subcommand per job, each in its own module.

Every command is listed from ``worker.cli.commands``; only the module of the command that
runs is imported, so ``--help``, ``--version`` and a mistyped command load none of the
commands' dependencies. Before a command that reads settings runs, unknown ``SUPERSIM_*``
variables are refused (``worker.handlers.registry.check_environment``): exit 2 naming each
one and the closest valid name. A failure is reported on standard error: as a JSON log line
once logging is configured for JSON, else as one line of text.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence
from typing import Any, Final, NoReturn

from worker.cli.commands import COMMANDS

WITHOUT_SETTINGS: Final = frozenset({"decode", "simulate"})
"""Commands that read no ``SUPERSIM_*`` settings (every other command's are checked)."""


class _Version(argparse.Action):
    """``--version``: argparse's, reading the installed version only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS) -> None:
        super().__init__(
            option_strings,
            dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show program's version number and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        from worker.version import package_version

        print(f"{parser.prog} {package_version()}")
        parser.exit()


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The parser, listing every command with its help. The modules of ``commands`` (all
    by default) add their full parsers; every other command gets a placeholder that only
    names it, and its module is not imported."""
    parser = argparse.ArgumentParser(
        prog="supersim-worker",
        description="Kinesis consumer for Super SIM Connection Events.",
    )
    parser.add_argument("--version", action=_Version)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if commands is None or name in commands:
            importlib.import_module(command.module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=command.help)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word that is not an option (the top-level
    options, ``--help`` and ``--version``, take no value), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def check_environment(args: argparse.Namespace) -> None:
    """Refuse unknown ``SUPERSIM_*`` variables for a command that reads settings (a
    ``--handlers`` flag adds the sections of the handlers it names)."""
    if args.command in WITHOUT_SETTINGS:
        return
    import os

    from worker.settings import Settings, split_names, unknown_variables, variable_names

    if not unknown_variables(os.environ, frozenset(variable_names(Settings))):
        return  # all the consumer's own: no handler (nor its dependencies) need be loaded
    from worker.handlers import registry

    flag = getattr(args, "handlers", None)
    registry.check_environment(handlers=split_names(flag) if isinstance(flag, str) else ())


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    command = chosen_command(words)
    args = build_parser(commands=[command] if command in COMMANDS else []).parse_args(words)
    try:
        check_environment(args)
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        failure = describe_failure(exc)
        if failure is None:
            raise
        message, code = failure
        report(message)
        return code
    return status


def describe_failure(exc: Exception) -> tuple[str, int] | None:
    """What to tell and the exit status for a failure a user can act on; None for any other
    exception (a bug: it propagates with its traceback).

    botocore's and redis' error classes are looked at only if their modules are loaded: an
    exception of theirs cannot exist otherwise, and a command that never used them (a
    settings error, ``usage``) does not load them just to say so."""
    from worker.errors import ConfigError, WorkerError

    if isinstance(exc, ConfigError):
        return str(exc), 2
    if "botocore.exceptions" in sys.modules:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return (
                "no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a role)",
                2,
            )
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            return (
                f"Kinesis refused {exc.operation_name}: "
                f"{error.get('Code', 'error')}: {error.get('Message', exc)}",
                1,
            )
    if "redis.exceptions" in sys.modules:
        from redis.exceptions import ConnectionError as RedisConnectionError

        if isinstance(exc, RedisConnectionError):
            return f"cannot reach Redis: {exc}", 1
    if isinstance(exc, WorkerError):  # an operation stopped part-way, e.g. a redrive by an outage
        return str(exc), 1
    return None


def report(message: str) -> None:
    """Tell why the command failed: a ``command_failed`` log line when logs are JSON (so
    every line a production worker writes is JSON, redacted like the others), else
    ``supersim-worker: message`` (settings that could not be read leave logging as is)."""
    from worker import logs

    if logs.renders_json():
        import structlog

        structlog.get_logger("worker.cli").error("command_failed", error=message)
    else:
        print(f"supersim-worker: {message}", file=sys.stderr)
