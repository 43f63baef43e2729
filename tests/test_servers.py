"""The real-server fixtures work with the clients the worker uses."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import servers
from aiobotocore.session import get_session


@pytest.fixture(params=["moto", "kinesalite"])
def backend(request: pytest.FixtureRequest) -> str:
    """Name of a Kinesis backend: each test using it runs against both."""
    name: str = request.param
    return name


@pytest.fixture
def kinesis_endpoint(request: pytest.FixtureRequest, backend: str) -> str:
    """Freshly reset endpoint of ``backend`` (the ``moto_endpoint``/``kinesalite_endpoint``)."""
    endpoint: str = request.getfixturevalue(f"{backend}_endpoint")
    return endpoint


@pytest.fixture
async def kinesis(kinesis_endpoint: str) -> AsyncIterator[Any]:
    """An aiobotocore Kinesis client for ``kinesis_endpoint``."""
    session = get_session()
    async with session.create_client(
        "kinesis", endpoint_url=kinesis_endpoint, region_name="us-east-1"
    ) as client:
        yield client


async def test_redis_ping_set_get(redis_url: str) -> None:
    """redis.asyncio can ping, set and get against the real redis-server."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert await client.ping()  # type: ignore[misc]  # typed as bool | Awaitable[bool]
        assert await client.dbsize() == 0
        await client.set("greeting", b"hello")
        assert await client.get("greeting") == b"hello"
    finally:
        await client.aclose()


async def test_redis_url_is_flushed(redis_server: servers.RedisServer, redis_url: str) -> None:
    """The redis_url fixture hands out an empty database (FLUSHALL before each test)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        await client.set("leftover", 1)
        redis_server.flush()
        assert await client.dbsize() == 0
    finally:
        await client.aclose()


async def test_kinesis_put_and_get_record(kinesis: Any) -> None:
    """A record put into a new stream comes back from a TRIM_HORIZON iterator."""
    await kinesis.create_stream(StreamName="events", ShardCount=1)
    waiter = kinesis.get_waiter("stream_exists")
    await waiter.wait(StreamName="events", WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})

    put = await kinesis.put_record(StreamName="events", Data=b'{"n": 1}', PartitionKey="sim-1")
    iterator = await kinesis.get_shard_iterator(
        StreamName="events", ShardId=put["ShardId"], ShardIteratorType="TRIM_HORIZON"
    )
    got = await kinesis.get_records(ShardIterator=iterator["ShardIterator"])

    assert [r["Data"] for r in got["Records"]] == [b'{"n": 1}']
    assert got["Records"][0]["SequenceNumber"] == put["SequenceNumber"]
    assert got["Records"][0]["PartitionKey"] == "sim-1"


async def test_kinesis_reset_removes_streams(
    request: pytest.FixtureRequest, backend: str, kinesis: Any
) -> None:
    """Each test starts with no streams, and reset() deletes the ones a test made."""
    assert (await kinesis.list_streams())["StreamNames"] == []

    await kinesis.create_stream(StreamName="leftover", ShardCount=1)
    waiter = kinesis.get_waiter("stream_exists")
    await waiter.wait(StreamName="leftover", WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})
    server: servers.MotoServer | servers.KinesaliteServer
    server = request.getfixturevalue(f"{backend}_server")
    server.reset()

    assert (await kinesis.list_streams())["StreamNames"] == []


def test_a_redis_server_on_the_port_that_is_not_ours_is_not_taken_for_ours(
    redis_server: servers.RedisServer,
) -> None:
    """Started on a port another process's redis-server holds (as when two test processes
    find the same free port), start-up fails instead of passing off the other server as
    this one (whose data every flush would then wipe)."""
    with pytest.raises(servers.ServerError, match="redis-server on port"):
        servers.start_redis(port=redis_server.port, timeout=5)
    assert redis_server.ping()


def test_a_moto_server_on_the_port_that_is_not_ours_is_not_taken_for_ours(
    moto_server: servers.MotoServer,
) -> None:
    """The same for moto_server: it is ready only once its own output says it listens."""
    binary = Path(sys.executable).parent / "moto_server"
    other = servers.MotoServer(
        [str(binary), "-H", servers.HOST, "-p", str(moto_server.port)], port=moto_server.port
    )
    with pytest.raises(servers.ServerError, match="moto_server on port"):
        other.wait_ready(other.serving, timeout=30)
    assert moto_server.serving()
