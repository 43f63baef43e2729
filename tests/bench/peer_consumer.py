"""The peer for ``peer_bench``: async-kinesis 3.0.1 with its ``RedisCheckPointer``,
decoding each record with orjson and doing nothing else.

Run by the peer's own virtualenv (``peer_bench.peer_python``), never by ours: it imports
only the standard library, ``kinesis`` (async-kinesis) and orjson::

    python peer_consumer.py MARKS.json ENDPOINT STREAM RECORDS

Redis is ``REDIS_HOST``/``REDIS_PORT`` (how ``RedisCheckPointer`` is configured). The
consumer starts at TRIM_HORIZON with a checkpointer of its own name and otherwise the
library's defaults (``record_limit`` 10,000, one GetRecords per shard and second, a 2 s
pause after an empty read). It takes ``RECORDS`` records from ``async for``, then closes
(checkpoints flushed, shards released). With ``RECORDS`` 0 it stops once every shard has
answered one GetRecords: start-up alone. At exit it writes the same marks as
``worker_probe.py``: ``first`` when the first record came out of the consumer, ``last``
after the last one, ``exit`` once the consumer is closed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from kinesis import Consumer, RedisCheckPointer
from kinesis.aggregators import SimpleAggregator
from kinesis.processors import Processor


class OrjsonProcessor(Processor, SimpleAggregator):
    """One record, one JSON document, parsed by orjson."""

    def serialize(self, item: Any) -> bytes:
        return orjson.dumps(item)

    def deserialize(self, data: bytes) -> Any:
        return orjson.loads(data)


def _now() -> list[float]:
    return [time.process_time(), time.perf_counter()]


async def _every_shard_read(consumer: Any) -> None:
    """Wait until each shard has answered one GetRecords (the library's own shard stats)."""
    await consumer.wait_ready()
    # The library sets no event for this: poll its shard stats (ASYNC110).
    while not all(  # noqa: ASYNC110
        shard.get("stats") is not None and shard["stats"].to_data()["success"] >= 1
        for shard in consumer.shards
    ):
        await asyncio.sleep(0.01)


async def consume(endpoint: str, stream: str, expected: int) -> dict[str, Any]:
    marks: dict[str, Any] = {"records": 0}
    checkpointer = RedisCheckPointer(name=f"bench-{uuid.uuid4().hex[:8]}")
    async with Consumer(
        stream,
        endpoint_url=endpoint,
        region_name="us-east-1",
        checkpointer=checkpointer,
        processor=OrjsonProcessor(),
    ) as consumer:
        if not expected:
            await _every_shard_read(consumer)
        count = 0
        while count < expected:
            async for _record in consumer:
                if not count:
                    marks["first"] = _now()
                count += 1
                if count >= expected:
                    break
        marks["records"] = count
        marks["last"] = _now()
    return marks


if __name__ == "__main__":
    out, endpoint, stream, records = sys.argv[1:5]
    result = asyncio.run(consume(endpoint, stream, int(records)))
    result["exit"] = _now()
    Path(out).write_bytes(orjson.dumps(result))
