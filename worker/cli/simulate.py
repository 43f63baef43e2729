"""``supersim-worker simulate``: a reproducible Super SIM fleet and its exact ground truth.

The simulator writes a realistic stream of Connection Events (JSON Lines, one CloudEvent per
line, as Kinesis records carry them) and a ground-truth JSON file next to it
(``<stem>.truth.json``). Everything comes from ``random.Random`` instances seeded with
strings derived from ``--seed`` (never the global generator, the wall clock or ``hash()``),
so the same options give byte-identical output.

What the SIMs do follows the Connection Events flowchart (see ``worker.devtools.simulator.timeline``):
normal SIMs attach and keep data sessions with ``data-session.updated`` every ~6 minutes;
``inactive`` SIMs (state ``new``/``inactive``) produce rejection storms (83704/83705);
``data_limit`` SIMs carry ``data_modifier: "blocked"`` with zero bytes from their daily limit
hit until the end of the UTC day; ``attach_loop`` SIMs attach every 20-40 s in episodes of
8 or more and never start a session. ``--outage`` injects one fleet-level 83702 rejection
episode (>= 25 SIMs of one fleet on one network within 3 minutes); ``--failure-bursts``
injects >= 12 ``attachment.failed`` for one SIM and >= 12 ``data-session.failed`` for
another, each within 5 minutes.

Metering and ``--subscription ended-only``: bytes are attributed to the UTC hour and day of
each window's ``data_session_update_end_time``, and no data session crosses a UTC midnight,
so per-SIM daily usage from ``data-session.ended`` cumulative totals alone equals usage
from every window. ``ended-only`` drops the ``data-session.updated`` events *after*
generation: all other records are byte-identical to the ``updated+ended`` run with the same
seed. Schema version 1 has no cumulative ``data_session_data_*`` fields, so a v1 (or
mixed) ``ended-only`` stream cannot be metered exactly; the truth says so with
``"ended_only_exact": false``.

Ground truth layout (keys sorted): ``options``, ``ended_only_exact``, ``records``,
``unique_events``, ``events_by_kind``, ``events_by_fleet`` (fleet sid -> kind -> unique
events), ``duplicates_written``, ``test_events``, ``records_by_envelope``,
``data_as_string``, ``usage`` (``fleet_total``, ``per_sim``,
``per_sim_day``, ``per_sim_hour``, ``per_fleet``, ``per_account``, ``per_network``,
``per_day``; each ``{up, down, total}``), ``sessions``, ``sims``, ``rejection_storms``,
``fleet_rejection_episodes``, ``failure_bursts``, ``data_limit_episodes``,
``attach_loops``.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cli.commands import COMMANDS
from worker.errors import ConfigError
from worker.events.records import EARLIEST_YEAR

if TYPE_CHECKING:
    from worker.devtools.simulator.options import SimulationOptions

DEFAULT_START_TEXT = "2024-03-01T00:00:00Z"
"""The simulator's default period start (``DEFAULT_START``), without importing it here:
the simulator is a development tool, loaded only when ``simulate`` runs."""


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share must be in [0, 1], got {text}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"hours must be > 0, got {text}")
    return value


_RELATIVE = re.compile(r"now(?:([+-])(\d+)([smhd]))?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _start(text: str) -> datetime:
    """RFC 3339 with an offset, or relative to the wall clock: ``now``, ``now-30m``,
    ``now+2h`` (units s, m, h, d), truncated to the whole second."""
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        sign, amount, unit = relative.groups()
        offset = timedelta(seconds=int(amount or 0) * _UNIT_SECONDS[unit or "s"])
        try:
            moment = datetime.now(UTC) + (-offset if sign == "-" else offset)
        except OverflowError:
            raise argparse.ArgumentTypeError(f"out of range: {text!r}") from None
    else:
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from None
        if value.tzinfo is None:
            raise argparse.ArgumentTypeError(f"start needs a UTC offset (e.g. Z): {text!r}")
        try:
            moment = value.astimezone(UTC)
        except OverflowError:
            raise argparse.ArgumentTypeError(f"out of range: {text!r}") from None
    if moment.year < EARLIEST_YEAR:  # the worker dead-letters such events
        raise argparse.ArgumentTypeError(f"start before {EARLIEST_YEAR}: {text!r}")
    return moment.replace(microsecond=0)


def _schema(text: str) -> int | str:
    return text if text == "mixed" else int(text)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``simulate`` on a subcommand set; it dispatches through ``args.func``."""
    parser = subparsers.add_parser(
        "simulate",
        help=COMMANDS["simulate"].help,
        description="Write simulated Connection Events (JSON Lines) and <stem>.truth.json.",
    )
    add = parser.add_argument
    add("--sims", type=_count(1), required=True, help="number of SIMs")
    add("--hours", type=_hours, required=True, help="simulated period in hours")
    add("--seed", type=int, required=True, help="random seed: same options, same bytes")
    add("--out", type=Path, required=True, help="JSON Lines output file")
    add(
        "--start",
        type=_start,
        default=DEFAULT_START_TEXT,
        help="period start: RFC 3339 with an offset, or now, now-30m, now+1h (s/m/h/d); "
        f"default {DEFAULT_START_TEXT}",
    )
    add("--inactive-share", type=_share, default=0.05, help="share of new/inactive SIMs")
    add("--data-limit-share", type=_share, default=0.05, help="share hitting a data limit")
    add("--attach-loop-share", type=_share, default=0.03, help="share stuck in attach loops")
    add("--roaming-share", type=_share, default=0.2, help="share switching networks")
    add("--outage", action="store_true", help="inject one fleet-level 83702 rejection episode")
    add("--failure-bursts", action="store_true", help="inject 83700 and 83701 failure bursts")
    add("--duplicates", type=_share, default=0.0, help="share of events written twice")
    add("--shuffle-window", type=_count(0), default=0, help="shuffle within N seconds")
    add("--kore-share", type=_share, default=0.0, help="share of records in KORE envelopes")
    add("--data-as-string-share", type=_share, default=0.0, help="share with string data")
    add("--test-events", type=_count(0), default=0, help="number of sink test events")
    add("--schema-version", type=_schema, choices=(1, 2, "mixed"), default=2)
    add("--subscription", choices=("updated+ended", "ended-only"), default="updated+ended")
    add("--fleets", type=_count(1), default=3, help="number of fleets")
    add("--accounts", type=_count(1), default=1, help="number of accounts (<= fleets)")
    parser.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> SimulationOptions:
    """The options a parsed ``simulate`` command line asks for; ConfigError if invalid."""
    from worker.devtools.simulator.options import SimulationOptions  # a dev tool: lazily

    try:
        return SimulationOptions(
            sims=args.sims,
            hours=args.hours,
            seed=args.seed,
            start=args.start,
            inactive_share=args.inactive_share,
            data_limit_share=args.data_limit_share,
            attach_loop_share=args.attach_loop_share,
            roaming_share=args.roaming_share,
            outage=args.outage,
            failure_bursts=args.failure_bursts,
            duplicate_share=args.duplicates,
            shuffle_window=args.shuffle_window,
            kore_share=args.kore_share,
            data_as_string_share=args.data_as_string_share,
            test_events=args.test_events,
            schema_version=args.schema_version,
            subscription=args.subscription,
            fleets=args.fleets,
            accounts=args.accounts,
        )
    except ValueError as exc:
        raise ConfigError(f"simulate: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """Write the stream and its truth; print one summary line."""
    from worker.devtools.simulator.core import write_with_truth  # a dev tool: lazily

    options = options_from_args(args)
    began = time.perf_counter()
    try:
        path, truth = write_with_truth(options, args.out)
    except ValueError as exc:  # an episode that cannot be placed in this fleet
        raise ConfigError(f"simulate: {exc}") from exc
    print(
        f"simulate: wrote {truth['records']} records to {args.out}, truth {path} "
        f"({time.perf_counter() - began:.1f}s)"
    )
    return 0
