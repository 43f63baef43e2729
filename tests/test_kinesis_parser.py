"""The worker's GetRecords parser gives what botocore's gives, on real responses of both
Kinesis servers (a closed parent's last read, with ChildShards, included) and on any body."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from typing import Any

import botocore.session
import orjson
import pytest
from aiobotocore.parsers import AioJSONParser
from hypothesis import given, settings
from hypothesis import strategies as st
from kinesis_support import create_stream, kinesis_client, put, wait_active, worker_settings

from worker.consumer import kinesis
from worker.consumer.kinesis_parser import (
    KinesisJSONParser,
    KinesisParserFactory,
    parse_get_records,
    parse_get_records_async,
)

MAX_HASH = 2**128 - 1
OUTPUT = (
    botocore.session.get_session()
    .get_service_model("kinesis")
    .operation_model("GetRecords")
    .output_shape
)


def botocore_parser() -> AioJSONParser:
    factory = KinesisParserFactory()
    factory.set_parser_defaults(timestamp_parser=kinesis.utc_timestamp)
    parser = AioJSONParser(**factory._defaults)
    assert type(parser) is AioJSONParser
    return parser


def fast_parser() -> KinesisJSONParser:
    factory = KinesisParserFactory()
    factory.set_parser_defaults(timestamp_parser=kinesis.utc_timestamp)
    parser = factory.create_parser("json")
    assert isinstance(parser, KinesisJSONParser)
    return parser


def without_metadata(response: dict[str, Any]) -> dict[str, Any]:
    """The response to compare: iterators and lag differ from call to call, so only their
    presence and type."""
    out = {k: v for k, v in response.items() if k != "ResponseMetadata"}
    for name in ("NextShardIterator", "MillisBehindLatest"):
        if name in out:
            out[name] = type(out[name]).__name__
    return out


async def read_both(endpoint: str, stream: str, shard: str) -> list[tuple[Any, Any]]:
    """Every GetRecords response of ``shard`` from TRIM_HORIZON, through the worker's client
    and through a plain aiobotocore client, page by page."""
    pages = []
    settings = worker_settings(endpoint, "redis://127.0.0.1:1", stream)
    async with kinesis.client(settings) as ours, kinesis_client(endpoint) as plain:
        iterators = []
        for client in (ours, plain):
            got = await client.get_shard_iterator(
                StreamName=stream, ShardId=shard, ShardIteratorType="TRIM_HORIZON"
            )
            iterators.append(got["ShardIterator"])
        for _ in range(20):
            mine = await ours.get_records(ShardIterator=iterators[0], Limit=7)
            theirs = await plain.get_records(ShardIterator=iterators[1], Limit=7)
            iterators = [mine.get("NextShardIterator"), theirs.get("NextShardIterator")]
            pages.append((without_metadata(mine), without_metadata(theirs)))
            if not mine.get("Records") and (not iterators[0] or pages[-1][0].get("ChildShards")):
                break
            if not iterators[0]:
                break
    return pages


@pytest.mark.parametrize("server", ["moto", "kinesalite"])
async def test_real_responses_parse_as_botocore_parses_them(
    server: str, request: pytest.FixtureRequest
) -> None:
    endpoint = request.getfixturevalue(f"{server}_endpoint")
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(endpoint, stream, shards=1)
    blobs = [os.urandom(n) for n in (1, 2, 3, 100, 1000)] + [b'{"a": 1}', b"x"]
    await put(endpoint, stream, blobs)
    if server == "kinesalite":  # close the shard: its reads end
        async with kinesis_client(endpoint) as client:
            await client.split_shard(
                StreamName=stream,
                ShardToSplit="shardId-000000000000",
                NewStartingHashKey=str(MAX_HASH // 2 + 1),
            )
            await wait_active(client, stream)
    pages = await read_both(endpoint, stream, "shardId-000000000000")
    data = [record["Data"] for mine, _ in pages for record in mine.get("Records", [])]
    assert data == blobs
    for mine, theirs in pages:
        # botocore's default timestamp parser gives local-time datetimes: equal instants.
        assert mine == theirs
        for record in mine.get("Records", []):
            assert record["ApproximateArrivalTimestamp"].utcoffset().total_seconds() == 0
    if server == "kinesalite":  # read to the end of the closed shard
        assert "NextShardIterator" not in pages[-1][0]


RECORD = st.fixed_dictionaries(
    {},
    optional={
        "SequenceNumber": st.one_of(st.text(max_size=5), st.none(), st.integers(-100, 100)),
        "Data": st.one_of(
            st.binary(max_size=20).map(lambda b: __import__("base64").b64encode(b).decode()),
            st.none(),
            st.just("not base64!"),
        ),
        "PartitionKey": st.one_of(st.text(max_size=5), st.none()),
        "ApproximateArrivalTimestamp": st.one_of(
            st.integers(0, 2_000_000_000),
            st.floats(0, 2e9, allow_nan=False),
            st.none(),
            st.text(max_size=3),
        ),
        "EncryptionType": st.one_of(st.just("KMS"), st.none()),
        "Unknown": st.integers(-100, 100),
    },
)
BODY = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "Records": st.one_of(st.lists(RECORD, max_size=4), st.none(), st.integers(-100, 100)),
            "NextShardIterator": st.one_of(st.text(max_size=5), st.none(), st.integers(-100, 100)),
            "MillisBehindLatest": st.one_of(st.integers(0, 10**6), st.none(), st.text()),
            "ChildShards": st.just([]),
            "Other": st.integers(-100, 100),
        },
    ),
    st.lists(st.integers(-100, 100), max_size=2),
)


def parse(parser: AioJSONParser, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", parser._handle_json_body(raw, OUTPUT)
    except Exception as exc:
        return "error", type(exc).__name__


@settings(max_examples=400, deadline=None)
@given(BODY)
def test_any_body_parses_as_botocore_parses_it(body: Any) -> None:
    raw = orjson.dumps(body)
    assert parse(fast_parser(), raw) == parse(botocore_parser(), raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b"null",
        b'{"Records": {}}',
        # Data that is not strict base64 (unpadded, with a newline, URL-safe, empty), or null
        *(b'{"Records": [{"Data": "%s"}]}' % data for data in (b"YQ", b"YQ==\\n", b"-_8=", b"")),
        b'{"Records": [{"Data": null, "SequenceNumber": "1"}]}',
        b'{"Records": [{"ApproximateArrivalTimestamp": true}]}',
        b'{"Records": [{"ApproximateArrivalTimestamp": 1765000000, "Other": {"a": 1}}]}',
        b'{"Records": [], "MillisBehindLatest": 1.0}',
        b'{"Records": [], "NextShardIterator": null, "ChildShards": []}',
        # not UTF-8 where msgspec would skip it, and a partition key that is
        b'{"Records": [{"Other": "\xff", "Data": "YQ=="}]}',
        b'{"Records": [{"\xff": 1}]}',
        '{"Records": [{"PartitionKey": "cl\u00e9", "Data": "YQ=="}]}'.encode(),
    ],
)
def test_odd_bodies_parse_as_botocore_parses_them(raw: bytes) -> None:
    assert parse(fast_parser(), raw) == parse(botocore_parser(), raw)


def parse_in_chunks(raw: bytes, chunk: int) -> tuple[str, Any]:
    try:
        return "ok", asyncio.run(parse_get_records_async(raw, kinesis.utc_timestamp, chunk))
    except Exception as exc:
        return "error", type(exc).__name__


def parse_whole(raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse_get_records(raw, kinesis.utc_timestamp)
    except Exception as exc:
        return "error", type(exc).__name__


@settings(max_examples=200, deadline=None)
@given(BODY)
def test_a_body_parsed_in_chunks_parses_as_in_one_go(body: Any) -> None:
    """Parsed a few records at a time, a body gives what it gives parsed whole (or is left
    to botocore the same way)."""
    raw = orjson.dumps(body)
    assert parse_in_chunks(raw, 2) == parse_whole(raw)


async def test_a_large_reply_lets_other_tasks_run_between_chunks() -> None:
    """The worker's client parses a GetRecords reply a chunk of records at a time, the event
    loop running other tasks in between, and gives the same response as botocore."""
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    records = [
        {
            "SequenceNumber": str(n),
            "Data": base64.b64encode(b"%d" % n).decode(),
            "PartitionKey": "k",
            "ApproximateArrivalTimestamp": 1_765_000_000.0 + n // 3,
        }
        for n in range(25)
    ]
    raw = orjson.dumps({"Records": records, "NextShardIterator": "i", "MillisBehindLatest": 0})
    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    try:
        started = turns
        parsed = await parse_get_records_async(raw, kinesis.utc_timestamp, chunk=10)
        taken = turns - started
    finally:
        other.cancel()
    assert taken >= 2  # three chunks: two turns for the other task
    assert parsed == botocore_parser()._handle_json_body(raw, OUTPUT)
    reply = {"body": raw, "headers": {}, "status_code": 200}
    assert await fast_parser().parse(reply, OUTPUT) == await botocore_parser().parse(reply, OUTPUT)
