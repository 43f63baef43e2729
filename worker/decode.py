"""Decode one Kinesis record's bytes into a typed event, or raise ``DecodeError``.

Accepts the Twilio and KORE envelopes (the kind is recognised by the
``supersim.connection.<kind>`` suffix of ``type``), ``data`` as an object or as a JSON
string, schema versions 1 and 2, and unknown extra fields. Sink test events decode to
``SinkTestEvent``; other well-formed CloudEvents to ``OtherEvent``. Nothing else escapes:
every failure is a ``DecodeError`` whose reason names the field and what was wrong, and
never echoes field values (they may be personal data).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import orjson
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from worker.errors import DecodeError
from worker.records import (
    MAX_RECORD_BYTES,
    ConnectionData,
    ConnectionEnvelope,
    ConnectionEvent,
    DecodedEvent,
    EventKind,
    KinesisMeta,
    OtherEvent,
    SinkTestEnvelope,
    SinkTestEvent,
    Vendor,
)

CONNECTION_MARK: Final = "supersim.connection."
SINK_TEST_TYPES: Final = frozenset(
    {"com.twilio.eventstreams.test-event", "com.kore.eventstreams.test.event"}
)
_KINDS: Final = {kind.value: kind for kind in EventKind}
_USAGE_FIELDS: Final = (
    "data_session_sid",
    "data_session_update_start_time",
    "data_session_update_end_time",
    "data_download",
    "data_upload",
    "data_total",
)
_MAX_ERRORS_SHOWN: Final = 3
_ENVELOPE_FIELDS: Final = frozenset(ConnectionEnvelope.model_fields)
_DATA_FIELDS: Final = frozenset(ConnectionData.model_fields)
_DATA_TIMES: Final = (
    "timestamp",
    "data_session_start_time",
    "data_session_end_time",
    "data_session_update_start_time",
    "data_session_update_end_time",
)
_any_datetime: Final = TypeAdapter(AwareDatetime)


def _parse_times(obj: dict[str, Any], names: tuple[str, ...]) -> None:
    """Replace RFC 3339 strings by aware UTC datetimes, in place.

    ``datetime.fromisoformat`` is several times faster than pydantic's parser; strings it
    does not take are tried with pydantic's, and anything neither accepts is left for the
    model to reject with a field-specific reason.
    """
    for name in names:
        value = obj.get(name)
        if value.__class__ is not str:
            continue
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            try:
                parsed = _any_datetime.validate_python(value)
            except ValidationError:
                continue
        if parsed.tzinfo is None:
            continue
        if parsed.tzinfo is not UTC:
            parsed = parsed.astimezone(UTC)
        obj[name] = parsed


def vendor_of(event_type: str) -> Vendor:
    if event_type.startswith("com.twilio."):
        return Vendor.TWILIO
    if event_type.startswith("com.kore."):
        return Vendor.KORE
    return Vendor.OTHER


def _schema_version(dataschema: str | None, data: dict[str, Any]) -> int:
    if dataschema:
        tail = dataschema.rstrip("/").rsplit("/", 1)[-1]
        if tail.isdigit():
            return int(tail)
    return 2 if "data_session_data_total" in data else 1


def _load(raw: bytes) -> Any:
    if len(raw) > MAX_RECORD_BYTES:
        raise DecodeError(f"record is {len(raw)} bytes, over the 1 MiB Kinesis record limit")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise DecodeError(
                f"record is not UTF-8 (invalid byte at offset {uexc.start})"
            ) from None
        raise DecodeError(f"record is not JSON ({exc})") from None


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors(include_url=False, include_input=False)
    parts = []
    for err in errors[:_MAX_ERRORS_SHOWN]:
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    more = len(errors) - _MAX_ERRORS_SHOWN
    if more > 0:
        parts.append(f"and {more} more")
    first = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
    return "; ".join(parts), first


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def decode(raw: bytes, meta: KinesisMeta | None = None) -> DecodedEvent:
    """Decode one record. Raises ``DecodeError`` (and only that) for any bad input."""
    obj = _load(raw)
    if not isinstance(obj, dict):
        raise DecodeError(f"record is a JSON {_type_name(obj)}, expected a CloudEvent object")
    event_type = obj.get("type")
    if not isinstance(event_type, str):
        what = "missing" if event_type is None else f"a {_type_name(event_type)}, not a string"
        raise DecodeError(f"envelope field 'type' is {what}", "type")
    if event_type in SINK_TEST_TYPES:
        return _sink_test(obj, event_type, meta)
    mark = event_type.find(CONNECTION_MARK)
    if mark < 0:
        event_id = obj.get("id")
        return OtherEvent(
            type=event_type, id=event_id if isinstance(event_id, str) else "", meta=meta
        )
    kind = _KINDS.get(event_type[mark + len(CONNECTION_MARK) :])
    if kind is None:
        raise DecodeError(f"unknown connection event kind in type {event_type!r}", "type")
    data = obj.get("data")
    if isinstance(data, str):
        try:
            obj["data"] = data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(
                f"field 'data' is a string that is not JSON ({exc})", "data"
            ) from None
    if not isinstance(data, dict):
        what = "missing" if data is None else f"a JSON {_type_name(data)}"
        raise DecodeError(f"field 'data' is {what}, expected an object", "data")
    _parse_times(obj, ("time",))
    _parse_times(data, _DATA_TIMES)
    try:
        envelope = ConnectionEnvelope.model_validate(obj)
    except ValidationError as exc:
        reason, field = _describe(exc)
        raise DecodeError(f"invalid {kind.value} event: {reason}", field) from None
    _check_kind(kind, envelope)
    return ConnectionEvent(
        kind=kind,
        vendor=vendor_of(event_type),
        schema_version=_schema_version(envelope.dataschema, data),
        envelope=envelope,
        meta=meta,
        extra=_extra(obj, data),
    )


def _extra(obj: dict[str, Any], data: dict[str, Any]) -> dict[str, Any] | None:
    unknown_envelope = obj.keys() - _ENVELOPE_FIELDS
    unknown_data = data.keys() - _DATA_FIELDS
    if not unknown_envelope and not unknown_data:
        return None
    return {
        "envelope": {k: obj[k] for k in unknown_envelope},
        "data": {k: data[k] for k in unknown_data},
    }


def _check_kind(kind: EventKind, envelope: ConnectionEnvelope) -> None:
    data = envelope.data
    if not data.event_type.endswith(kind.value):
        raise DecodeError(
            f"envelope type is {kind.value} but data.event_type is {data.event_type!r}",
            "data.event_type",
        )
    if kind.is_data_session and kind is not EventKind.DATA_SESSION_FAILED:
        if data.data_session_sid is None:
            raise DecodeError(
                f"{kind.value} event lacks data.data_session_sid", "data.data_session_sid"
            )
    if kind.carries_usage:
        for name in _USAGE_FIELDS:
            if getattr(data, name) is None:
                raise DecodeError(f"{kind.value} event lacks data.{name}", f"data.{name}")


def _sink_test(obj: dict[str, Any], event_type: str, meta: KinesisMeta | None) -> SinkTestEvent:
    try:
        envelope = SinkTestEnvelope.model_validate(obj)
    except ValidationError as exc:
        reason, field = _describe(exc)
        raise DecodeError(f"invalid sink test event: {reason}", field) from None
    return SinkTestEvent(vendor=vendor_of(event_type), envelope=envelope, meta=meta)
