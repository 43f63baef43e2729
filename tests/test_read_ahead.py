"""Read-ahead is bounded: polling fetches a batch only when the reader has room for it."""

from __future__ import annotations

import asyncio
import uuid

import structlog
from kinesis_support import create_stream, events, kinesis_client, put
from test_observability import get, samples, start, stop, total
from test_process import worker_env

from worker.backoff import Backoff
from worker.consumer.polling import Polling
from worker.consumer.positions import TRIM_HORIZON
from worker.consumer.retrieval import Fetched, ShardFeed
from worker.devtools.local_servers import free_port
from worker.metrics import Metrics

SHARD = "shardId-000000000000"


async def test_polling_fetches_only_when_the_read_ahead_has_room(
    kinesalite_endpoint: str,
) -> None:
    """However much waits on the shard, polling calls GetRecords once per batch the reader
    has room for, never ahead of it: no fetched batch waits outside the read-ahead."""
    stream = f"read-ahead-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream)
    await put(kinesalite_endpoint, stream, events(50))
    grants: asyncio.Queue[None] = asyncio.Queue()  # one entry: room for one batch
    delivered: list[Fetched] = []
    arrived = asyncio.Event()

    async def room() -> None:
        await grants.get()

    async def deliver(fetched: Fetched) -> None:
        delivered.append(fetched)
        arrived.set()

    async with kinesis_client(kinesalite_endpoint) as client:
        feed = ShardFeed(
            kinesis=client,
            stream=stream,
            shard_id=SHARD,
            start=TRIM_HORIZON,
            batch_limit=10,
            idle_interval=0.2,
            stopping=asyncio.Event(),
            metrics=Metrics(),
            backoff=Backoff(base=0.05, cap=0.5),
            answered=lambda: None,
            log=structlog.get_logger("test"),
            room=room,
        )
        fetcher = asyncio.create_task(Polling().fetch(feed, deliver))
        try:
            await asyncio.sleep(0.5)
            assert delivered == []  # no room: nothing fetched
            for granted in (1, 2, 3):
                arrived.clear()
                grants.put_nowait(None)
                await asyncio.wait_for(arrived.wait(), 10)
                await asyncio.sleep(0.3)  # time enough to call again, were it to
                assert len(delivered) == granted
        finally:
            fetcher.cancel()
            await asyncio.gather(fetcher, return_exceptions=True)
    records = [record.data for fetched in delivered for record in fetched.records]
    assert records == events(30)


async def test_a_reader_fetches_at_most_its_read_ahead_beyond_the_batch_it_handles(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """While a backlog waits behind a slow handler, a worker's GetRecords calls never run
    more than the batch being handled plus ``SUPERSIM_PREFETCH_BATCHES`` ahead of the
    batches it has handled (read from its /metrics as it goes)."""
    count, limit, prefetch = 80, 10, 1
    stream = f"read-ahead-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream)
    await put(kinesalite_endpoint, stream, events(count))
    port = free_port()
    env = worker_env(
        kinesalite_endpoint,
        redis_url,
        stream,
        SUPERSIM_HTTP_PORT=str(port),
        SUPERSIM_BATCH_LIMIT=str(limit),
        SUPERSIM_PREFETCH_BATCHES=str(prefetch),
        RECORDING_DELAY="0.3",
    )
    env["SUPERSIM_LEASE_TTL"] = "30"  # no lease lapse under load: no batch dropped, re-read
    ahead: list[float] = []  # GetRecords calls beyond the batches handled, per reading
    process = start(env)
    try:
        async with asyncio.timeout(90):
            while True:
                status, text = await get(port, "/metrics")
                if status == 200:
                    found = samples(text)
                    read = total(found, "supersim_records_read_total")
                    if read >= count:
                        break
                    calls = total(found, "supersim_get_records_calls_total")
                    ahead.append(calls - read // limit)
                await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(stop, process)
    assert ahead, "the worker's /metrics never answered while it read"
    # The batch being handled and the read-ahead: never a batch fetched beyond them.
    assert max(ahead) == 1 + prefetch, ahead
