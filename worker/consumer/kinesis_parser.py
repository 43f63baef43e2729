"""A faster parser for GetRecords responses, installed on the worker's Kinesis client.

botocore turns a response body into Python by walking the operation's output shape value
by value; for GetRecords (up to 10,000 records a call) that walk, and its base64 decoding
of every ``Data`` blob, cost about a quarter of the worker's CPU per record. This parser
reads the body with orjson and builds the same result directly: the output's and each
record's known members (unknown keys dropped, nulls left out, as botocore does), ``Data``
base64-decoded, ``ApproximateArrivalTimestamp`` as an aware UTC datetime. Anything it
does not expect — a body that is not an object, a member of another type, ``ChildShards``
(the last read of a closed shard) — goes to botocore's own parser, as does every other
operation and every error response. A test compares both parsers on real responses.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import orjson
from aiobotocore.parsers import AioJSONParser, AioResponseParserFactory
from botocore.utils import parse_timestamp

GET_RECORDS_OUTPUT: Final = "GetRecordsOutput"
_RECORD_STRINGS: Final = ("SequenceNumber", "PartitionKey", "EncryptionType")
_OUTPUT_KEYS: Final = frozenset({"Records", "NextShardIterator", "MillisBehindLatest"})


class _Fallback(Exception):
    """The body is not what the fast path expects: botocore parses it."""


class KinesisJSONParser(AioJSONParser):  # type: ignore[misc]  # aiobotocore is untyped
    """botocore's JSON parser, with GetRecords bodies parsed by ``parse_get_records``."""

    _timestamp: Callable[[Any], datetime]

    def _handle_json_body(self, raw_body: bytes, shape: Any) -> Any:
        if shape is not None and shape.name == GET_RECORDS_OUTPUT and raw_body:
            try:
                return parse_get_records(raw_body, self._timestamp)
            except _Fallback:
                pass
        return super()._handle_json_body(raw_body, shape)


def parse_get_records(raw_body: bytes, timestamp: Callable[[Any], datetime]) -> dict[str, Any]:
    """A GetRecords body as botocore would parse it; raises ``_Fallback`` if unsure."""
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
        out["Records"] = [_record(item, timestamp) for item in records]
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


def _record(item: Any, timestamp: Callable[[Any], datetime]) -> dict[str, Any]:
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
            record["Data"] = binascii.a2b_base64(data)
        except (binascii.Error, ValueError):
            raise _Fallback from None
    arrival = item.get("ApproximateArrivalTimestamp")
    if arrival is not None:
        if arrival.__class__ is not int and arrival.__class__ is not float:
            raise _Fallback
        record["ApproximateArrivalTimestamp"] = timestamp(arrival)
    return record


class KinesisParserFactory(AioResponseParserFactory):  # type: ignore[misc]
    """Creates ``KinesisJSONParser`` for the JSON protocol (Kinesis'), botocore's otherwise."""

    def create_parser(self, protocol_name: str) -> Any:
        if protocol_name == "json":
            parser = KinesisJSONParser(**self._defaults)
            parser._timestamp = self._defaults.get("timestamp_parser") or parse_timestamp
            return parser
        return super().create_parser(protocol_name)
