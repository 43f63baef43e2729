"""The Kinesis side: client creation, shard discovery and error classification."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.utils import parse_timestamp

from worker.consumer.kinesis_parser import KinesisParserFactory
from worker.errors import is_aws_transient
from worker.settings import Settings

EXPIRED_ITERATOR: Final = "ExpiredIteratorException"
KinesisClient = Any
"""aiobotocore's client is generated at run time and has no static type."""


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def is_retriable(exc: BaseException) -> bool:
    """Throttling, server errors, timeouts and connection problems are worth retrying."""
    if isinstance(exc, ClientError):
        return is_aws_transient(exc)
    if isinstance(
        exc, NoCredentialsError | PartialCredentialsError | NoRegionError | ParamValidationError
    ):
        return False  # configuration: retrying cannot help
    return isinstance(exc, BotoCoreError | aiohttp.ClientError | asyncio.TimeoutError | OSError)


def utc_timestamp(value: Any) -> datetime:
    """Timestamps in responses: Kinesis sends epoch seconds. botocore's default turns them
    into local-time datetimes through dateutil, at ~25 µs a record; this is ~0.3 µs."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    parsed: datetime = parse_timestamp(value)
    return parsed.astimezone(UTC)


@asynccontextmanager
async def client(
    settings: Settings, *, read_timeout: float = 15, max_connections: int = 64
) -> AsyncIterator[KinesisClient]:
    """An aiobotocore Kinesis client. botocore's own retries are off: we classify and retry.
    ``read_timeout`` bounds each read of a reply (for SubscribeToShard, the wait for its next
    event); ``max_connections`` the open connections (a subscription holds one)."""
    config = AioConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=read_timeout,
        max_pool_connections=max_connections,
    )
    session = get_session()
    parsers = KinesisParserFactory()
    parsers.set_parser_defaults(timestamp_parser=utc_timestamp)
    session.register_component("response_parser_factory", parsers)
    async with session.create_client(
        "kinesis",
        region_name=settings.region,
        endpoint_url=settings.kinesis_endpoint(),
        config=config,
    ) as kinesis:
        yield kinesis


@dataclass(frozen=True, slots=True)
class ShardInfo:
    shard_id: str
    parent: str | None
    adjacent_parent: str | None
    starting_sequence: str
    ending_sequence: str | None

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(p for p in (self.parent, self.adjacent_parent) if p)

    @property
    def closed(self) -> bool:
        return self.ending_sequence is not None


async def retention_hours(kinesis: KinesisClient, stream: str) -> int | None:
    """The stream's data retention in hours, or None if it cannot be read (a missing
    permission, a local server without DescribeStreamSummary)."""
    try:
        response = await kinesis.describe_stream_summary(StreamName=stream)
        hours = response["StreamDescriptionSummary"]["RetentionPeriodHours"]
    except (BotoCoreError, ClientError, KeyError, TypeError):
        return None
    return hours if isinstance(hours, int) else None


async def list_shards(kinesis: KinesisClient, stream: str) -> list[ShardInfo]:
    """Every shard of the stream still in retention, following NextToken."""
    shards: list[ShardInfo] = []
    kwargs: dict[str, Any] = {"StreamName": stream}
    while True:
        response = await kinesis.list_shards(**kwargs)
        for shard in response.get("Shards", []):
            ranges = shard.get("SequenceNumberRange", {})
            shards.append(
                ShardInfo(
                    shard_id=shard["ShardId"],
                    parent=shard.get("ParentShardId"),
                    adjacent_parent=shard.get("AdjacentParentShardId"),
                    starting_sequence=ranges.get("StartingSequenceNumber", ""),
                    ending_sequence=ranges.get("EndingSequenceNumber"),
                )
            )
        token = response.get("NextToken")
        if not token:
            return shards
        kwargs = {"NextToken": token}
