"""A faster parser for GetRecords responses, installed on the worker's Kinesis client.

botocore turns a response body into Python by walking the operation's output shape value
by value; for GetRecords (up to 10,000 records a call) that walk, and its base64 decoding
of every ``Data`` blob, cost about a quarter of the worker's CPU per record. This parser
reads the body with msgspec into the same result directly, in one pass in C: the output's
and each record's known members (unknown record keys dropped, as botocore does), ``Data``
base64-decoded (strictly: padded, standard alphabet, no whitespace), then
``ApproximateArrivalTimestamp`` as an aware UTC datetime. Anything it does not expect — a
body that is not an object or not UTF-8, a member of another type, a null inside a record,
``Data`` that is not strict base64, ``ChildShards`` (the last read of a closed shard) or
another unknown member — goes to botocore's own parser, as does every other operation and
every error response. A test compares both parsers on real responses and on generated
bodies.

The arrival times of a reply's records are converted ``PARSE_CHUNK`` at a time, the event
loop running other tasks in between (the lease renewals above all). Records put together
share their arrival time, so each distinct one is converted once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from datetime import datetime
from typing import Any, Final, TypedDict

import msgspec
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory
from botocore.utils import parse_timestamp

GET_RECORDS_OUTPUT: Final = "GetRecordsOutput"


class _Record(TypedDict, total=False):
    """A record as GetRecords gives it (the service model's ``Record``): msgspec keeps only
    these keys, and refuses a value of another type (null included)."""

    SequenceNumber: str
    ApproximateArrivalTimestamp: int | float
    Data: bytes
    PartitionKey: str
    EncryptionType: str


class _Output(msgspec.Struct, forbid_unknown_fields=True):
    """A GetRecords body this parser reads; any other member (``ChildShards``) refuses it."""

    Records: list[_Record] | None = None
    NextShardIterator: str | None = None
    MillisBehindLatest: int | None = None


_DECODE: Final = msgspec.json.Decoder(_Output).decode

PARSE_CHUNK: Final = 1000
"""Records whose arrival time is converted between two turns of the event loop."""


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
    if not raw_body.isascii():
        # msgspec does not check the UTF-8 of what it skips (an unknown record key's value);
        # botocore decodes the whole body first. Replies are ASCII but for partition keys.
        try:
            raw_body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Fallback from None
    try:
        body = _DECODE(raw_body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise _Fallback from None
    out: dict[str, Any] = {}
    records = body.Records
    if records is not None:
        arrivals = _Arrivals(timestamp)
        for at in range(0, len(records), chunk):
            if at:
                yield
            for record in records[at : at + chunk]:
                arrival = record.get("ApproximateArrivalTimestamp")
                if arrival is not None:
                    record["ApproximateArrivalTimestamp"] = arrivals(arrival)  # type: ignore[typeddict-item]
        out["Records"] = records
    if body.NextShardIterator is not None:
        out["NextShardIterator"] = body.NextShardIterator
    if body.MillisBehindLatest is not None:
        out["MillisBehindLatest"] = body.MillisBehindLatest
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


class KinesisParserFactory(AioResponseParserFactory):  # type: ignore[misc]
    """Creates ``KinesisJSONParser`` for the JSON protocol (Kinesis'), botocore's otherwise."""

    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            parser = KinesisJSONParser(**self._defaults)
            parser._timestamp = self._defaults.get("timestamp_parser") or parse_timestamp
            return parser
        return super().create_parser(protocol_name)
