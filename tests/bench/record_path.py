"""The consumer's own work per record, without I/O: a GetRecords body parsed, its records
taken as ``RawRecord``s, decoded by the batch pipeline, counted by kind and freed.

    python tests/bench/record_path.py BATCHES [RECORDS]

runs BATCHES batches of RECORDS (2,000) records of every kind in turn and prints the best
CPU µs per record. CPU time moves with the machine's load; instructions do not, so
before/after figures are best taken as the difference of two runs under valgrind (which
cancels start-up), per record::

    valgrind --tool=cachegrind --cache-sim=no --cachegrind-out-file=/dev/null \\
        python tests/bench/record_path.py 1     # and with 6: (I refs of 6 - of 1) / 10,000

with ``PYTHONHASHSEED=0`` and ``PYTHONPATH`` naming the tree to measure (a ``git archive``
of another commit's ``worker`` for "before"). A development tool, not part of ``make bench``.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import inspect
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/events.py

from events import KINDS, make_record

from worker.consumer.kinesis import utc_timestamp
from worker.consumer.kinesis_parser import parse_get_records
from worker.consumer.pipeline import BatchOutcome, BatchProcessor, raw_records
from worker.metrics import Metrics


def body(count: int) -> bytes:
    """A GetRecords body of ``count`` records, put 500 at a time (shared arrival times)."""
    return get_records_body([make_record(KINDS[i % len(KINDS)], seq=i) for i in range(count)])


def get_records_body(records: Sequence[bytes]) -> bytes:
    """A GetRecords body holding ``records``, put 500 at a time (shared arrival times)."""
    return orjson.dumps(
        {
            "Records": [
                {
                    "SequenceNumber": f"{i:056d}",
                    "Data": base64.b64encode(raw).decode(),
                    "PartitionKey": f"k{i % 100}",
                    "ApproximateArrivalTimestamp": 1_765_000_000.0 + i // 500,
                }
                for i, raw in enumerate(records)
            ],
            "NextShardIterator": "next",
            "MillisBehindLatest": 5,
        }
    )


async def one_batch(raw: bytes, processor: BatchProcessor) -> int:
    response = parse_get_records(raw, utc_timestamp)
    records = raw_records(response.get("Records", ()))
    del response
    outcome = BatchOutcome(records=len(records))
    decoded = processor.decode_all("shardId-000000000000", records, outcome)
    if inspect.isawaitable(decoded):  # it was not, before decoding yielded to the loop
        decoded = await decoded
    batch, _ = decoded  # a Batch, or a list of events from versions before Batch.decoded
    return len(batch) + sum(outcome.kinds.values())


async def main(batches: int, count: int) -> None:
    raw = body(count)
    processor = BatchProcessor([], None, Metrics())  # type: ignore[arg-type]  # never writes
    gc.freeze()
    best = float("inf")
    for _ in range(batches):
        began = time.process_time()
        await one_batch(raw, processor)
        best = min(best, time.process_time() - began)
    print(f"{best / count * 1e6:.2f} µs per record (best of {batches} batches of {count:,})")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2000))
