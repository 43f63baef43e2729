"""``supersim-worker health [--ready]``: ask the running worker's ``/healthz`` (or
``/readyz``) on ``127.0.0.1:$SUPERSIM_HTTP_PORT``, for exec probes and container health
checks. Exit 0 when healthy (ready), 1 when not or when nothing answers, 2 without
``SUPERSIM_HTTP_PORT``. Prints the worker's answer."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from worker.cli.commands import COMMANDS
from worker.errors import ConfigError
from worker.settings import load_settings

TIMEOUT = 3.0


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.http_port is None:
        raise ConfigError("SUPERSIM_HTTP_PORT: required by `health` (the port the worker serves)")
    path = "/readyz" if args.ready else "/healthz"
    url = f"http://127.0.0.1:{settings.http_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"supersim-worker health: no answer from {url}: {exc}", file=sys.stderr)
        return 1


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "health",
        help=COMMANDS["health"].help,
        description="GET /healthz (or /readyz) of the worker on 127.0.0.1:$SUPERSIM_HTTP_PORT.",
    )
    parser.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    parser.set_defaults(func=run)
