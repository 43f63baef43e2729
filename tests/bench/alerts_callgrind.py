"""The alert scripts' Redis work: redis-server instructions per event, by handler.

    python tests/bench/alerts_callgrind.py [--events 10000] [--batch 1000]
        [--handlers rejections data_limit attach_loops] [--kinds KIND ...]
        [--mode store|job|live]

Runs redis-server under ``valgrind --tool=callgrind`` (as ``metering_callgrind.py``) and hands
it the first ``--events`` connection events of a simulated stream (400 SIMs over 8 hours,
seed 11) through one alert handler at a time, in batches of ``--batch`` on one shard,
counting the server's instructions from after the first batch to the end (``--mode``:
whether the hits are walked, below). Instruction
counts do not move with the machine's load, unlike CPU time; for a before/after pair run
it again with ``PYTHONPATH`` naming another version's ``worker`` package. A development
tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import redis.asyncio
import structlog

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from metering_callgrind import count_batches, server_instructions  # noqa: E402

from worker.devtools.simulator import SimulationOptions, generate  # noqa: E402
from worker.events.decode import decode  # noqa: E402
from worker.events.records import ConnectionEvent  # noqa: E402
from worker.handlers.alerts.handler import AlertHandler  # noqa: E402
from worker.handlers.alerts.rules.attach_loops import AttachLoopsHandler  # noqa: E402
from worker.handlers.alerts.rules.data_limit import DataLimitHandler  # noqa: E402
from worker.handlers.alerts.rules.rejections import RejectionsHandler  # noqa: E402
from worker.handlers.alerts.settings import AlertSettings  # noqa: E402
from worker.handlers.base import HandlerContext  # noqa: E402

OPTIONS = SimulationOptions(sims=400, hours=8, seed=11)
HANDLERS: dict[str, type[AlertHandler]] = {
    "rejections": RejectionsHandler,
    "data_limit": DataLimitHandler,
    "attach_loops": AttachLoopsHandler,
}


MODES = ("store", "job", "live")
"""``store``: the batches only, within the handlers' warm-up (the clock stands still), so
hits are stored and nothing is walked or closed; ``job``: the same, then the tick of a
``run --until-caught-up`` that ends caught up, which walks and closes everything; ``live``:
no warm-up, so each batch walks what event time passed (as a long backfill or a live
worker does), then that tick."""


async def _alert(
    url: str, name: str, events: Sequence[ConnectionEvent], batch: int, pid: int, mode: str
) -> None:
    connection = redis.asyncio.Redis.from_url(url)
    settings = AlertSettings(
        sinks="log", stale_after=None, **({"shard_warmup": 0} if mode == "live" else {})
    )
    end = (OPTIONS.start + timedelta(hours=OPTIONS.hours + 24)).timestamp()
    handler = HANDLERS[name](HandlerContext(settings, connection, "{bench}"), clock=lambda: end)

    async def after() -> None:
        if mode != "store":
            await handler.tick()
        await handler.flush()

    try:
        await count_batches(handler.handle, events, batch, pid, after=after)
    finally:
        await handler.close()
        await connection.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--handlers", nargs="*", default=sorted(HANDLERS))
    parser.add_argument(
        "--kinds",
        nargs="*",
        help="only events of these kinds (e.g. data-session.updated, which `rejections` and "
        "`attach_loops` ignore: what a call costs with nothing to do)",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="store",
        help="store: batches within the warm-up, nothing walked; job: then the final tick "
        "of a run --until-caught-up; live: no warm-up, walks as batches come, then that tick",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt install valgrind)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    records, _ = generate(OPTIONS)
    events = [
        e
        for e in map(decode, records)
        if isinstance(e, ConnectionEvent) and (not args.kinds or e.kind.value in args.kinds)
    ][: args.events]
    counted = len(events) - min(args.batch, len(events))
    print(f"{counted:,} events after the first batch, batches of {args.batch:,}, mode {args.mode}")
    print("| handler | instructions per event |\n|---|---:|")
    for name in args.handlers:
        total = server_instructions(
            lambda url, pid, name=name: _alert(url, name, events, args.batch, pid, args.mode)
        )
        print(f"| `{name}` | {total / counted:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
