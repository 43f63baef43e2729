"""Resharding on kinesalite (which closes parent shards like AWS): a split, then a merge."""

from __future__ import annotations

import asyncio
import uuid

from kinesis_support import create_stream, events, kinesis_client, put, wait_active, worker_settings
from recording import seen, wait_handled

from worker import keys
from worker.consumer.app import run_worker

MAX_HASH = 2**128 - 1


async def test_split_then_merge_loses_nothing_and_reads_parents_first(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """Across a split and a merge mid-stream every record is handled once, parents before children."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    key_prefix = keys.prefix(stream, "supersim-worker")
    await create_stream(kinesalite_endpoint, stream, shards=1)
    settings = worker_settings(kinesalite_endpoint, redis_url, stream, batch_limit=25)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, install_signals=False, stop=stop))
    try:
        await put(kinesalite_endpoint, stream, events(100))
        await wait_handled(redis_url, key_prefix, 20)
        async with kinesis_client(kinesalite_endpoint) as client:
            await client.split_shard(
                StreamName=stream,
                ShardToSplit="shardId-000000000000",
                NewStartingHashKey=str(MAX_HASH // 2 + 1),
            )
            await wait_active(client, stream)
        await put(kinesalite_endpoint, stream, events(100, start=100))
        async with kinesis_client(kinesalite_endpoint) as client:
            await client.merge_shards(
                StreamName=stream,
                ShardToMerge="shardId-000000000001",
                AdjacentShardToMerge="shardId-000000000002",
            )
            await wait_active(client, stream)
        await put(kinesalite_endpoint, stream, events(100, start=200))
        await wait_handled(redis_url, key_prefix, 300)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 30)
    handled = await seen(redis_url, key_prefix)
    sids = [sid for _, _, sid in handled]
    assert len(sids) == 300
    assert len(set(sids)) == 300
    shards = [shard for shard, _, _ in handled]
    assert set(shards) == {f"shardId-00000000000{i}" for i in range(4)}

    def first(shard: str) -> int:
        return shards.index(shard)

    def last(shard: str) -> int:
        return len(shards) - 1 - shards[::-1].index(shard)

    assert last("shardId-000000000000") < first("shardId-000000000001")
    assert last("shardId-000000000000") < first("shardId-000000000002")
    assert last("shardId-000000000001") < first("shardId-000000000003")
    assert last("shardId-000000000002") < first("shardId-000000000003")
    for shard in set(shards):
        sequences = [int(seq) for s, seq, _ in handled if s == shard]
        assert sequences == sorted(sequences)
