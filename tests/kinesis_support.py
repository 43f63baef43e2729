"""Helpers for tests that drive a real Kinesis server (moto_server or kinesalite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiobotocore.session import get_session
from events import make_record

from worker.cli.replay import put_all
from worker.settings import Settings, load_settings


@asynccontextmanager
async def kinesis_client(endpoint: str) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "kinesis", region_name="us-east-1", endpoint_url=endpoint
    ) as client:
        yield client


async def wait_active(client: Any, stream: str) -> None:
    for _ in range(300):
        description = await client.describe_stream_summary(StreamName=stream)
        if description["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"stream {stream} never became ACTIVE")


async def create_stream(endpoint: str, stream: str, shards: int = 1) -> None:
    async with kinesis_client(endpoint) as client:
        await client.create_stream(StreamName=stream, ShardCount=shards)
        await wait_active(client, stream)


async def put(endpoint: str, stream: str, records: Sequence[bytes]) -> None:
    """PutRecords in order, one call at a time, partition key = SIM sid."""
    async with kinesis_client(endpoint) as client:
        await put_all(client, stream, records)


async def put_to_shard(endpoint: str, stream: str, records: Sequence[bytes], hash_key: str) -> None:
    """Put records so they all land on the shard owning ``hash_key``."""
    async with kinesis_client(endpoint) as client:
        for start in range(0, len(records), 500):
            chunk = records[start : start + 500]
            response = await client.put_records(
                StreamName=stream,
                Records=[
                    {"Data": raw, "PartitionKey": "k", "ExplicitHashKey": hash_key} for raw in chunk
                ],
            )
            assert not response.get("FailedRecordCount")


def events(
    count: int, start: int = 0, kind: str = "attachment.accepted", **fields: Any
) -> list[bytes]:
    """``count`` distinct connection event records (distinct event sids and SIMs)."""
    return [
        make_record(
            kind,
            seq=start + i,
            fields={"data.sim_sid": f"HS{(start + i) % 97:032x}", **fields},
        )
        for i in range(count)
    ]


def worker_settings(endpoint: str, redis_url: str, stream: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "stream_name": stream,
        "endpoint_url": endpoint,
        "redis_url": redis_url,
        "handlers": ("recording:create",),
        "initial_position": "TRIM_HORIZON",
        "idle_interval": 0.2,
        "discovery_interval": 1.0,
        "lease_ttl": 10,
        "log_format": "json",
    }
    values.update(overrides)
    return load_settings(**values)
