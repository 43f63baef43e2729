"""Where metering's Redis work goes: redis-server instructions per event of ``metering.lua``.

    python tests/bench/metering_callgrind.py [--events 10000] [--batch 1000]

Runs redis-server under ``valgrind --tool=callgrind`` (valgrind from the system's packages),
hands it the first ``--events`` connection events of a simulated stream (400 SIMs over 8
hours, seed 11) through the metering handler in batches of ``--batch``, and counts the
server's instructions from after the first batch (the script loaded, the first keys made)
to the end. Instruction counts do not move with the machine's load, unlike CPU time.

It does so three times, with the script cut short at two points (``CUTS``), so the
difference between runs is the share of each part: the call itself and the decoding of the
batch's texts; the per-event logic (each event unpacked from the packed argument), reads of
session records included; the writes (bucket totals, session records, expiries). A
development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import redis
import redis.asyncio
import structlog

from worker.devtools.simulator import SimulationOptions, generate
from worker.events.decode import decode
from worker.events.records import ConnectionEvent
from worker.handlers.base import Batch
from worker.handlers.metering import handler as metering
from worker.handlers.metering.settings import MeteringSettings

CUTS: Final = (
    ("the call and decoding the batch", "local TEXTS = cjson.decode(ARGV[7])\n"),
    ("the per-event logic, reads included", "-- ---- writes " + "-" * 79 + "\n"),
    ("the writes", None),
)
"""(part, the line of metering.lua after which the script returns at once, None: whole)."""

_load_script: Final = metering.load_script


def cut_after(line: str | None) -> Callable[[], str]:
    def load() -> str:
        source = _load_script()
        if line is None:
            return source
        assert source.count(line) == 1, line
        return source.replace(line, line + "\nif true then return {0, 0} end\n")

    return load


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def instructions(events: Sequence[ConnectionEvent], batch: int, cut: str | None) -> int:
    """Server instructions to meter ``events`` after the first batch, script cut at ``cut``."""
    metering.load_script = cut_after(cut)
    return server_instructions(lambda url, pid: _meter(url, events, batch, pid))


def server_instructions(drive: Callable[[str, int], Coroutine[Any, Any, None]]) -> int:
    """Instructions of a redis-server under callgrind between ``drive``'s zeroing and dump of
    the counts (``drive(url, pid)``: it calls ``_control("-z", pid)``, then ``"-d"``)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(600):
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)
            asyncio.run(drive(url, server.pid))
        finally:
            server.terminate()
            server.wait()
        dump = Path(f"{out}.1")  # callgrind_control -d: the counts since the zeroing
        for line in dump.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit("no totals in the callgrind dump")


def _control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


async def count_batches(
    handle: Callable[[Batch], Awaitable[None]],
    events: Sequence[ConnectionEvent],
    batch: int,
    pid: int,
    after: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Hand ``events`` to ``handle`` in batches of ``batch``, counting the server's
    instructions from after the first batch to the end (``after`` run before the dump)."""
    batches = [events[i : i + batch] for i in range(0, len(events), batch)]
    await handle(Batch("shardId-000000000000", list(batches[0])))
    await asyncio.to_thread(_control, "-z", pid)  # zero the counts
    for part in batches[1:]:
        await handle(Batch("shardId-000000000000", list(part)))
    if after is not None:
        await after()
    await asyncio.to_thread(_control, "-d", pid)  # dump them


async def _meter(url: str, events: Sequence[ConnectionEvent], batch: int, pid: int) -> None:
    connection = redis.asyncio.Redis.from_url(url)
    handler = metering.MeteringHandler(connection, "{bench}", MeteringSettings())
    try:
        await count_batches(handler.handle, events, batch, pid)
    finally:
        await connection.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1_000)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt install valgrind)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    records, _ = generate(SimulationOptions(sims=400, hours=8, seed=11))
    events = [e for e in map(decode, records) if isinstance(e, ConnectionEvent)][: args.events]
    counted = len(events) - min(args.batch, len(events))
    totals = [instructions(events, args.batch, line) / counted for _, line in CUTS]
    print(f"{counted:,} events after the first batch, batches of {args.batch:,}")
    print("| part | instructions per event | share |\n|---|---:|---:|")
    previous = 0.0
    for (part, _), total in zip(CUTS, totals, strict=True):
        print(f"| {part} | {total - previous:,.0f} | {(total - previous) / totals[-1]:.0%} |")
        previous = total
    print(f"| whole script | {totals[-1]:,.0f} | 100% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
