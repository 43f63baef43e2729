"""A faster parser for GetRecords responses, installed on the worker's Kinesis client.

botocore turns a response body into Python by walking the operation's output shape value
by value; for GetRecords (up to 10,000 records a call) that walk, and its base64 decoding
of every ``Data`` blob, cost about a quarter of the worker's CPU per record. This parser
reads the body with orjson and builds the same result directly: the output's and each
record's known members (unknown keys dropped, nulls left out, as botocore does), ``Data``
base64-decoded (by pybase64, with SIMD), ``ApproximateArrivalTimestamp`` as an aware UTC
datetime. Anything it does not expect — a body that is not an object, a member of another type, ``ChildShards``
(the last read of a closed shard) — goes to botocore's own parser, as does every other
operation and every error response. A test compares both parsers on real responses.

A reply's records are turned into Python ``PARSE_CHUNK`` at a time, the event loop running
other tasks in between (the lease renewals above all): a 10,000-record reply parsed in one
go held the loop for tens of milliseconds, several times that on a loaded machine. Records
put together share their arrival time, so each distinct one is converted once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from datetime import datetime
from typing import Any, Final

import orjson
import pybase64
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory
from botocore.utils import parse_timestamp

GET_RECORDS_OUTPUT: Final = "GetRecordsOutput"
_RECORD_STRINGS: Final = ("SequenceNumber", "PartitionKey", "EncryptionType")
_OUTPUT_KEYS: Final = frozenset({"Records", "NextShardIterator", "MillisBehindLatest"})


PARSE_CHUNK: Final = 1000
"""Records turned into Python between two turns of the event loop: a 10,000-record reply
(base64 of every record included) would otherwise hold the loop for its whole parse."""


class _Fallback(Exception):
    """The body is not what the fast path expects: botocore parses it."""


class KinesisJSONParser(AioJSONParser):  # type: ignore[misc]  # aiobotocore is untyped
    """botocore's JSON parser, with GetRecords bodies parsed by ``parse_get_records``: in
    ``PARSE_CHUNK`` records at a time, other tasks running between chunks."""

    _timestamp: Callable[[Any], datetime]

    async def _do_parse(self, response: dict[str, Any], shape: Any) -> Any:
        body = response["body"]
        if shape is None or shape.name != GET_RECORDS_OUTPUT or not body:
            return await super()._do_parse(response, shape)
        try:
            parsed = await parse_get_records_async(body, self._timestamp)
        except _Fallback:
            parsed = super()._handle_json_body(body, shape)
        self._inject_response_metadata(parsed, response["headers"])
        return parsed

    def _handle_json_body(self, raw_body: bytes, shape: Any) -> Any:
        if shape is not None and shape.name == GET_RECORDS_OUTPUT and raw_body:
            try:
                return parse_get_records(raw_body, self._timestamp)
            except _Fallback:
                pass
        return super()._handle_json_body(raw_body, shape)


def parse_get_records(raw_body: bytes, timestamp: Callable[[Any], datetime]) -> dict[str, Any]:
    """A GetRecords body as botocore would parse it; raises ``_Fallback`` if unsure."""
    steps = _parse(raw_body, timestamp, PARSE_CHUNK)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            parsed: dict[str, Any] = done.value
            return parsed


async def parse_get_records_async(
    raw_body: bytes, timestamp: Callable[[Any], datetime], chunk: int = PARSE_CHUNK
) -> dict[str, Any]:
    """``parse_get_records``, letting the event loop run other tasks every ``chunk``
    records."""
    steps = _parse(raw_body, timestamp, chunk)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            parsed: dict[str, Any] = done.value
            return parsed
        await asyncio.sleep(0)


def _parse(
    raw_body: bytes, timestamp: Callable[[Any], datetime], chunk: int
) -> Generator[None, None, dict[str, Any]]:
    """Parse a GetRecords body, yielding between chunks of ``chunk`` records."""
    try:
        body = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        raise _Fallback from None
    if body.__class__ is not dict or not _OUTPUT_KEYS.issuperset(body):
        raise _Fallback  # ChildShards, or a member this parser does not know
    out: dict[str, Any] = {}
    records = body.get("Records")
    if records is not None:
        if records.__class__ is not list:
            raise _Fallback
        parsed: list[dict[str, Any]] = []
        arrivals = _Arrivals(timestamp)
        for at in range(0, len(records), chunk):
            if at:
                yield
            parsed += [_record(item, arrivals) for item in records[at : at + chunk]]
        out["Records"] = parsed
    iterator = body.get("NextShardIterator")
    if iterator is not None:
        if iterator.__class__ is not str:
            raise _Fallback
        out["NextShardIterator"] = iterator
    behind = body.get("MillisBehindLatest")
    if behind is not None:
        if behind.__class__ is not int:
            raise _Fallback
        out["MillisBehindLatest"] = behind
    return out


class _Arrivals:
    """``ApproximateArrivalTimestamp`` values as datetimes, the last one remembered: records
    put together arrive at the same time, and a datetime is immutable, so it is shared."""

    __slots__ = ("_parse", "_parsed", "_raw")

    def __init__(self, parse: Callable[[Any], datetime]) -> None:
        self._parse = parse
        self._raw: Any = None
        self._parsed: datetime | None = None

    def __call__(self, raw: int | float) -> datetime:
        if raw != self._raw or self._parsed is None:
            self._parsed = self._parse(raw)
            self._raw = raw
        return self._parsed


def _record(item: Any, arrivals: _Arrivals) -> dict[str, Any]:
    if item.__class__ is not dict:
        raise _Fallback
    record: dict[str, Any] = {}
    for name in _RECORD_STRINGS:
        value = item.get(name)
        if value is not None:
            if value.__class__ is not str:
                raise _Fallback
            record[name] = value
    data = item.get("Data")
    if data is not None:
        if data.__class__ is not str:
            raise _Fallback
        try:
            # pybase64 decodes with SIMD, about six times faster than binascii here;
            # validate=True refuses what strict base64 would (botocore's parser then reads it).
            record["Data"] = pybase64.b64decode(data, validate=True)
        except ValueError:  # binascii.Error is one
            raise _Fallback from None
    arrival = item.get("ApproximateArrivalTimestamp")
    if arrival is not None:
        if arrival.__class__ is not int and arrival.__class__ is not float:
            raise _Fallback
        record["ApproximateArrivalTimestamp"] = arrivals(arrival)
    return record


class KinesisParserFactory(AioResponseParserFactory):  # type: ignore[misc]
    """Creates ``KinesisJSONParser`` for the JSON protocol (Kinesis'), botocore's otherwise."""

    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            parser = KinesisJSONParser(**self._defaults)
            parser._timestamp = self._defaults.get("timestamp_parser") or parse_timestamp
            return parser
        return super().create_parser(protocol_name)
