"""``supersim-worker usage``: metered data usage and data sessions, read from Redis.

    supersim-worker usage --sim HS... [--from 2024-03-01] [--to 2024-03-31] [--hourly]
    supersim-worker usage --fleet HF... | --account AC... | --network US-310-260
    supersim-worker usage --sessions HS...
    ... [--format table|csv|json] [--stream NAME] [--group NAME]

Figures are bytes down, up and total per UTC day (or hour with ``--hourly``) over an
inclusive range of UTC dates (default: the last 30 days), attributed as
``worker.handlers.metering.handler`` describes. ``--sessions`` lists the data sessions of one SIM
that started in the range, shaped like the DataSession resource (they include the IMEI
and cell location: this output is personal data).

This module is the command line and the output formats; the figures and sessions are read
by ``worker.handlers.metering.usage``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, TextIO

from worker.cli.commands import COMMANDS
from worker.errors import ConfigError

if TYPE_CHECKING:
    from worker.handlers.metering.usage import Usage

# Redis, orjson, the settings and the metering reader are imported where they are used,
# so `usage --help` and a malformed command line load none of them.

DEFAULT_DAYS: Final = 30
MAX_DAYS: Final = 3660
FORMATS: Final = ("table", "csv", "json")
_TABLE_SESSION_COLUMNS: Final = (
    "sid",
    "start",
    "end",
    "radio_link",
    "operator_name",
    "operator_country",
    "data_download",
    "data_upload",
    "data_total",
)


# --- output ---------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int]) -> str:
    cells = [[str(h) for h in header]] + [
        ["" if v is None else str(v) for v in row] for row in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])]) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buffer.getvalue()


def render_figures(
    rows: Sequence[Usage],
    fmt: str,
    *,
    dimension: str,
    ident: str,
    first: date,
    last: date,
    hourly: bool,
) -> str:
    down, up = sum(r.down for r in rows), sum(r.up for r in rows)
    if fmt == "json":
        import orjson

        document = {
            "dimension": dimension,
            "id": ident,
            "from": first.isoformat(),
            "to": last.isoformat(),
            "granularity": "hour" if hourly else "day",
            "rows": [r.as_dict() for r in rows],
            "total": {"down": down, "up": up, "total": down + up},
        }
        return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"
    header = ("hour" if hourly else "day", "down", "up", "total")
    table_rows = [(r.period, r.down, r.up, r.total) for r in rows]
    if fmt == "csv":
        return _csv(header, table_rows)
    title = f"{dimension} {ident}, {first.isoformat()} to {last.isoformat()} (UTC), bytes\n"
    return title + _table(header, [*table_rows, ("total", down, up, down + up)], {1, 2, 3})


def render_sessions(found: Sequence[dict[str, Any]], fmt: str) -> str:
    from worker.handlers.metering.usage import SESSION_COLUMNS

    if fmt == "json":
        import orjson

        return orjson.dumps(list(found), option=orjson.OPT_INDENT_2).decode() + "\n"

    def flat(item: dict[str, Any]) -> dict[str, Any]:
        where = item["cell_location_estimate"] or {}
        return {**item, "lat": where.get("lat"), "lon": where.get("lon")}

    columns = SESSION_COLUMNS if fmt == "csv" else _TABLE_SESSION_COLUMNS
    rows = [[flat(item)[c] for c in columns] for item in found]
    if fmt == "csv":
        return _csv(columns, rows)
    numeric = {i for i, c in enumerate(columns) if c.startswith("data_")}
    return _table(columns, rows, numeric)


# --- command line ---------------------------------------------------------------------------


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``usage`` on a subcommand set; it dispatches through ``args.func``."""
    parser = subparsers.add_parser(
        "usage",
        help=COMMANDS["usage"].help,
        description="Print bytes down/up/total per UTC day (or hour) for a SIM, fleet, "
        "account or network, or list a SIM's data sessions.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--sim", metavar="SIM_SID", help="a SIM's usage")
    which.add_argument("--fleet", metavar="FLEET_SID", help="a fleet's usage")
    which.add_argument("--account", metavar="ACCOUNT_SID", help="an account's usage")
    which.add_argument(
        "--network", metavar="ISO-MCC-MNC", help="a visited network's usage, e.g. US-310-260"
    )
    which.add_argument("--sessions", metavar="SIM_SID", help="list a SIM's data sessions")
    parser.add_argument(
        "--from",
        dest="first",
        metavar="YYYY-MM-DD",
        type=_date,
        help="first UTC date (default: 29 days before --to)",
    )
    parser.add_argument(
        "--to",
        dest="last",
        metavar="YYYY-MM-DD",
        type=_date,
        help="last UTC date, inclusive (default: today)",
    )
    parser.add_argument("--hourly", action="store_true", help="one row per UTC hour")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format")
    parser.add_argument("--stream", help="stream name (default: SUPERSIM_STREAM_NAME)")
    parser.add_argument("--group", help="consumer group (default: SUPERSIM_CONSUMER_GROUP)")
    parser.set_defaults(func=run)


def _range(args: argparse.Namespace, today: date) -> tuple[date, date]:
    last: date = args.last or today
    first: date = args.first or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise ConfigError(f"--from {first.isoformat()} is after --to {last.isoformat()}")
    if (last - first).days >= MAX_DAYS:
        raise ConfigError(f"the date range is longer than {MAX_DAYS} days")
    return first, last


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Print the requested figures or sessions; 0 on success."""
    import redis

    from worker import keys
    from worker.handlers.metering.usage import figures, sessions
    from worker.settings import load_settings

    overrides: dict[str, str] = {}
    if args.stream:
        overrides["stream_name"] = args.stream
    if args.group:
        overrides["consumer_group"] = args.group
    settings = load_settings(**overrides)
    if not settings.stream_name:
        raise ConfigError("SUPERSIM_STREAM_NAME: required (or pass --stream)")
    prefix = keys.prefix(settings.stream_name, settings.consumer_group)
    first, last = _range(args, datetime.now(UTC).date())
    target = out or sys.stdout
    client = redis.Redis.from_url(settings.redis_dsn, socket_timeout=10)
    try:
        if args.sessions:
            found = sessions(client, prefix, args.sessions, first, last)
            target.write(render_sessions(found, args.format))
            return 0
        dimension, ident = next(
            (name, getattr(args, name))
            for name in ("sim", "fleet", "account", "network")
            if getattr(args, name)
        )
        rows = figures(client, prefix, dimension, ident, first, last, hourly=args.hourly)
        target.write(
            render_figures(
                rows,
                args.format,
                dimension=dimension,
                ident=ident,
                first=first,
                last=last,
                hourly=args.hourly,
            )
        )
    except redis.RedisError as exc:
        raise ConfigError(f"cannot read usage from Redis: {exc.__class__.__name__}: {exc}") from exc
    finally:
        client.close()
    return 0
