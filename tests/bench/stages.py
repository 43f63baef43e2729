"""CPU per record of each step of the worker's own work, on distinct simulated records.

    python tests/bench/stages.py [--records 10000] [--repeat 7] [--chunks 100,10000]

Builds a GetRecords body of ``--records`` simulator records (560 SIMs over 24 hours,
seed 7: each record different, as in a real stream, so the CPU's caches hold few of them)
and times, in this process, the best of ``--repeat`` runs of each step: the body parsed
(records, base64), the records decoded into events (``decode`` alone, then the pipeline's
``decode_all``), three walks of the decoded batches for their latest event time (what the
alert handlers did before ``Batch.latest``), metering's encoding of the events for its
script, and each alert handler's ``collect`` with its script request. No I/O, no
Redis. Instruction counts would not show what these steps spend waiting on memory, so this
reports process CPU; for a before/after pair run it twice in one sitting, the second time
with ``PYTHONPATH`` naming another version's ``worker`` package (an unpacked ``git
archive``). A development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio

import worker
from worker.consumer.kinesis import utc_timestamp
from worker.consumer.kinesis_parser import parse_get_records
from worker.consumer.pipeline import BatchOutcome, BatchProcessor, raw_records
from worker.devtools.simulator import SimulationOptions, generate
from worker.events.decode import decode
from worker.events.records import ConnectionEvent
from worker.handlers.alerts.episodes import Subjects
from worker.handlers.alerts.rules.attach_loops import AttachLoopsHandler
from worker.handlers.alerts.rules.data_limit import DataLimitHandler
from worker.handlers.alerts.rules.rejections import RejectionsHandler
from worker.handlers.alerts.settings import AlertSettings
from worker.handlers.base import HandlerContext
from worker.handlers.metering import handler as metering
from worker.metrics import Metrics

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from record_path import get_records_body  # noqa: E402

BATCH = 2500
"""Events a handler gets at once (as from a 10,000-record read over four shards)."""


def best_of(repeat: int, step: Callable[[], Any]) -> float:
    """The least CPU seconds of ``repeat`` runs of ``step``."""
    best = float("inf")
    for _ in range(repeat):
        began = time.process_time()
        result = step()
        best = min(best, time.process_time() - began)
        del result
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--chunks",
        default="",
        help="also decode the records this many at a time, each lot freed before the next, "
        "alone and with every handler's own work on each lot (comma-separated sizes, e.g. "
        "100,10000): how much the CPU's caches weigh",
    )
    args = parser.parse_args(argv)
    gc.set_threshold(500_000, 50, 100)  # as the worker runs (worker/consumer/app.py)
    records = generate(SimulationOptions(sims=560, hours=24, seed=7))[0][: args.records]
    raw_body = get_records_body(records)
    events = [e for e in map(decode, records) if isinstance(e, ConnectionEvent)]
    batches = [events[i : i + BATCH] for i in range(0, len(events), BATCH)]
    # An older version names its caches differently; all it needs is one per handler.
    texts = getattr(metering, "_Texts", None) or metering._Hours  # type: ignore[attr-defined]
    cache = texts()

    # Each batch's kinds, as the pipeline notes them while decoding (``Batch.kinds``, not
    # timed here: "records decoded" is ``decode`` alone); older versions' handlers read each
    # event's kind themselves.
    kinds = [[event.kind for event in part] for part in batches]
    takes_kinds = "kinds" in inspect.signature(metering.encode).parameters
    extra: Callable[[int], tuple[Any, ...]] = (
        (lambda i: (kinds[i],)) if takes_kinds else (lambda i: ())
    )

    def meter() -> None:
        for i, part in enumerate(batches):
            encoded = metering.encode(part, cache, *extra(i))
            distinct = list(dict.fromkeys(encoded[0]))
            pack = getattr(metering, "pack_events", None)  # versions before it sent JSON
            if pack is None:
                orjson.dumps(distinct)
            elif hasattr(metering, "texts_argument"):  # texts numbered by encode
                pack(distinct)
                metering.texts_argument(encoded.texts)
            else:
                pack(distinct)

    raw = raw_records(parse_get_records(raw_body, utc_timestamp)["Records"])
    processor = BatchProcessor([], None, Metrics())  # type: ignore[arg-type]  # never writes
    loop = asyncio.new_event_loop()

    def decode_all() -> Any:
        return loop.run_until_complete(
            processor.decode_all("shardId-000000000000", raw, BatchOutcome(records=len(raw)))
        )

    def latest_walks() -> None:
        for part in batches:  # each alert handler walked its batch for the latest time
            for _ in range(3):
                max(event.envelope.data.timestamp for event in part)

    steps: dict[str, Callable[[], Any]] = {
        "GetRecords body parsed (records, base64 of Data)": lambda: parse_get_records(
            raw_body, utc_timestamp
        ),
        "records decoded into events": lambda: [decode(raw) for raw in records],
        "the pipeline's decoding (`decode_all`: kinds counted, or noted with the latest time)": (
            decode_all
        ),
        "three walks of each batch for its latest time (the alert handlers' before `Batch.latest`)": (
            latest_walks
        ),
        "metering: events encoded for its script": meter,
    }
    settings = AlertSettings(sinks="log")
    client = redis.asyncio.Redis()  # never connects: collect and request only
    alerts = []
    for cls in (RejectionsHandler, DataLimitHandler, AttachLoopsHandler):
        handler = cls(HandlerContext(settings, client, "{stages}"), clock=lambda: 0.0)
        alerts.append(handler)

        def alert(handler: Any = handler) -> None:
            collect_kinds = getattr(handler, "collect_kinds", None)
            for i, part in enumerate(batches):
                subjects = Subjects()
                if collect_kinds is not None:
                    collect_kinds(part, kinds[i], subjects)
                else:
                    handler.collect(part, subjects)
                orjson.dumps([subject.request(0) for subject in subjects])

        steps[f"`{handler.name}`: collect and request"] = alert
    for size in filter(None, args.chunks.split(",")):

        def in_lots(size: int = int(size)) -> None:
            for at in range(0, len(records), size):
                lot = [decode(raw) for raw in records[at : at + size]]
                del lot

        def handled_in_lots(size: int = int(size)) -> None:
            # Every handler's own work on each lot while the CPU's caches still hold it, the
            # script requests made once at the end (what a lot-by-lot handler API would do).
            encoded: list[Any] = []
            collected = [Subjects() for _ in alerts]
            for at in range(0, len(records), size):
                lot = [decode(raw) for raw in records[at : at + size]]
                lot_kinds = [event.kind for event in lot]
                encoded += metering.encode(lot, cache, *((lot_kinds,) if takes_kinds else ()))[0]
                for handler, subjects in zip(alerts, collected, strict=True):
                    collect_kinds = getattr(handler, "collect_kinds", None)
                    if collect_kinds is not None:
                        collect_kinds(lot, lot_kinds, subjects)
                    else:
                        handler.collect(lot, subjects)
                del lot
            metering.pack_events(list(dict.fromkeys(encoded)))  # (each lot numbers its texts)
            for subjects in collected:
                orjson.dumps([subject.request(0) for subject in subjects])

        steps[f"records decoded {int(size):,} at a time"] = in_lots
        steps[f"records decoded and handled {int(size):,} at a time"] = handled_in_lots
    print(f"worker package: {worker.__file__}")
    print(f"{len(records):,} records, {len(events):,} connection events, batches of {BATCH:,}")
    print("| step | CPU µs per record |\n|---|---:|")
    for name, step in steps.items():
        print(f"| {name} | {best_of(args.repeat, step) / len(records) * 1e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
