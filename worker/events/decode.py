"""Decode one Kinesis record's bytes into a typed event, or raise ``DecodeError``.

Accepts the Twilio and KORE envelopes (the kind is recognised by the
``supersim.connection.<kind>`` suffix of ``type``), ``data`` as an object or as a JSON
string, schema versions 1 and 2, and unknown extra fields. Sink test events decode to
``SinkTestEvent``; other well-formed CloudEvents (string ``specversion``, ``id``,
``source`` and ``type``) to ``OtherEvent``. Nothing else escapes: every failure is a
``DecodeError`` whose reason names the field and what was wrong, and never echoes field
values (they may be personal data).

This runs once per record, so the common path is kept short: known event types are looked
up in a table, the models' validators are called directly (``model_validate`` adds a
Python-level wrapper) and parse RFC 3339 times in UTC themselves. Only when that first
validation fails does the careful path run: it rewrites valid times with other offsets
into UTC, and turns what is still wrong into a ``DecodeError`` with a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from pydantic import ValidationError

from worker.errors import DecodeError
from worker.events.records import (
    EARLIEST_YEAR,
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
TWILIO_CONNECTION_PREFIX: Final = "com.twilio.iot.supersim.connection."
KORE_CONNECTION_PREFIX: Final = "com.kore.supersim.connection."
CLOUDEVENT_REQUIRED: Final = ("specversion", "id", "source")
"""CloudEvents attributes every event must carry as strings (besides ``type``)."""

_KINDS: Final = {kind.value: kind for kind in EventKind}
_SESSION_FIELDS: Final = ("data_session_sid", "data_session_start_time")
"""What started, updated and ended events must carry: metering files a session's windows
under its start, so a copy without it would be counted as another session."""
_USAGE_FIELDS: Final = (
    *_SESSION_FIELDS,
    "data_session_update_start_time",
    "data_session_update_end_time",
    "data_download",
    "data_upload",
    "data_total",
)


def _required_fields(kind: EventKind) -> tuple[str, ...]:
    """``data`` fields the model leaves optional but events of ``kind`` must carry."""
    if kind.carries_usage:
        return _USAGE_FIELDS
    if kind.is_data_session and kind is not EventKind.DATA_SESSION_FAILED:
        return _SESSION_FIELDS
    return ()


_REQUIRED: Final = {kind: _required_fields(kind) for kind in EventKind}
_TYPE_SUFFIXES: Final = {kind: CONNECTION_MARK + kind.value for kind in EventKind}
_KNOWN_TYPES: Final = {
    prefix + kind.value: (kind, vendor, _REQUIRED[kind])
    for prefix, vendor in (
        (TWILIO_CONNECTION_PREFIX, Vendor.TWILIO),
        (KORE_CONNECTION_PREFIX, Vendor.KORE),
    )
    for kind in EventKind
}
"""The published connection event types, so the common case is one dict lookup (enum
members hash in Python, so the kind's required fields come from here too)."""
_KNOWN_SCHEMAS: Final = {
    f"{host}/SuperSim.ConnectionEvent/{version}": version
    for host in ("https://events-schemas.twilio.com", "https://events-schemas.korewireless.com")
    for version in (1, 2)
}
_MAX_ERRORS_SHOWN: Final = 3
_MAX_SHOWN_CHARS: Final = 80
_ENVELOPE_FIELDS: Final = frozenset(ConnectionEnvelope.model_fields)
_DATA_FIELDS: Final = frozenset(ConnectionData.model_fields)
_ENVELOPE_TIMES: Final = ("time",)
_DATA_TIMES: Final = (
    "timestamp",
    "data_session_start_time",
    "data_session_end_time",
    "data_session_update_start_time",
    "data_session_update_end_time",
)
_validate_connection: Final = ConnectionEnvelope.__pydantic_validator__.validate_python
_validate_sink_test: Final = SinkTestEnvelope.__pydantic_validator__.validate_python


def decode(raw: bytes, meta: KinesisMeta | None = None) -> DecodedEvent:
    """Decode one record. Raises ``DecodeError`` (and only that) for any bad input."""
    obj = _load(raw)
    if obj.__class__ is not dict:
        raise DecodeError(f"record is a JSON {_type_name(obj)}, expected a CloudEvent object")
    event_type = obj.get("type")
    if event_type.__class__ is not str:
        raise DecodeError(f"envelope field 'type' is {_what(obj, 'type')}", "type")
    known = _KNOWN_TYPES.get(event_type)
    if known is not None:
        kind, vendor, required = known
    else:
        if event_type in SINK_TEST_TYPES:
            return _sink_test(obj, event_type, meta)
        mark = event_type.find(CONNECTION_MARK)
        if mark < 0:
            return _other(obj, event_type, meta)
        found = _KINDS.get(event_type[mark + len(CONNECTION_MARK) :])
        if found is None:
            raise DecodeError(f"unknown connection event kind in type {_shown(event_type)}", "type")
        kind, vendor, required = found, vendor_of(event_type), _REQUIRED[found]

    data = obj.get("data")
    if data.__class__ is str:
        try:
            obj["data"] = data = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(
                f"field 'data' is a string that is not JSON ({exc})", "data"
            ) from None
    if data.__class__ is not dict:
        what = "missing" if "data" not in obj else f"a JSON {_type_name(data)}"
        raise DecodeError(f"field 'data' is {what}, expected an object", "data")

    try:
        envelope: ConnectionEnvelope = _validate_connection(obj)
    except ValidationError:
        envelope = _validate_carefully(obj, data, kind)
    fields = envelope.data
    reported = fields.event_type
    if reported != event_type and not reported.endswith(_TYPE_SUFFIXES[kind]):
        raise DecodeError(
            f"envelope type is {kind.value} but data.event_type is {_shown(reported)}",
            "data.event_type",
        )
    for name in required:
        if getattr(fields, name) is None:
            raise DecodeError(f"{kind.value} event lacks data.{name}", f"data.{name}")
    # The models ignore unknown fields, so the fields they set are fewer than the keys given
    # exactly when there are unknown ones: two length checks instead of two set scans.
    if len(obj) == len(envelope.__pydantic_fields_set__) and len(data) == len(
        fields.__pydantic_fields_set__
    ):
        extra = None
    else:
        extra = _extra(obj, data)
    return _new_connection_event(
        kind, vendor, _schema_version(envelope.dataschema, data), envelope, meta, extra
    )


def _validate_carefully(
    obj: dict[str, Any], data: dict[str, Any], kind: EventKind
) -> ConnectionEnvelope:
    """The path taken when the first validation failed: normalise times, then validate
    again, and explain what is still wrong."""
    _normalise_times(obj, _ENVELOPE_TIMES, kind.value, "")
    _normalise_times(data, _DATA_TIMES, kind.value, "data.")
    try:
        envelope: ConnectionEnvelope = _validate_connection(obj)
    except ValidationError as exc:
        reason, field = _describe(exc)
        raise DecodeError(f"invalid {kind.value} event: {reason}", field) from None
    return envelope


def _connection_event_builder() -> Callable[
    [EventKind, Vendor, int, ConnectionEnvelope, KinesisMeta | None, Mapping[str, Any] | None],
    ConnectionEvent,
]:
    """A constructor for ``ConnectionEvent`` that sets its slots directly.

    A frozen dataclass's ``__init__`` goes through ``object.__setattr__`` for every field,
    which costs about as much as a third of ``orjson.loads`` on a typical record; the slots'
    own descriptors do the same in half the time. A test checks both build equal events.
    """
    setters = [
        ConnectionEvent.__dict__[field.name].__set__ for field in dataclass_fields(ConnectionEvent)
    ]
    if len(setters) != 6:  # pragma: no cover - guards an edit of ConnectionEvent
        raise RuntimeError("ConnectionEvent's fields changed: update _connection_event_builder")
    set_kind, set_vendor, set_version, set_envelope, set_meta, set_extra = setters
    new = object.__new__

    def build(
        kind: EventKind,
        vendor: Vendor,
        schema_version: int,
        envelope: ConnectionEnvelope,
        meta: KinesisMeta | None,
        extra: Mapping[str, Any] | None,
    ) -> ConnectionEvent:
        event: ConnectionEvent = new(ConnectionEvent)
        set_kind(event, kind)
        set_vendor(event, vendor)
        set_version(event, schema_version)
        set_envelope(event, envelope)
        set_meta(event, meta)
        set_extra(event, extra)
        return event

    return build


_new_connection_event: Final = _connection_event_builder()


def vendor_of(event_type: str) -> Vendor:
    if event_type.startswith("com.twilio."):
        return Vendor.TWILIO
    if event_type.startswith("com.kore."):
        return Vendor.KORE
    return Vendor.OTHER


def _load(raw: bytes) -> Any:
    if len(raw) > MAX_RECORD_BYTES:
        raise DecodeError(f"record is {len(raw)} bytes, over the 1 MiB Kinesis record limit")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise DecodeError(
                f"record is not UTF-8 (invalid byte at offset {uexc.start})"
            ) from None
        raise DecodeError(f"record is not JSON ({exc})") from None


def _normalise_times(obj: dict[str, Any], names: tuple[str, ...], what: str, prefix: str) -> None:
    """Rewrite RFC 3339 strings into the UTC form the models parse, in place.

    Any offset is accepted and converted to UTC, and lower-case ``t``/``z`` are read too. A
    string ``datetime.fromisoformat`` rejects, or one without a UTC offset, fails here with
    a reason naming the field; values of other types are left for the model to refuse.
    """
    for name in names:
        value = obj.get(name)
        if value.__class__ is not str:
            continue
        parsed: datetime | None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = _parse_lowercase(value)
        if parsed is None:
            problem = "not an RFC 3339 date-time"
        elif parsed.tzinfo is None:
            problem = "an RFC 3339 date-time needs a UTC offset (Z or +hh:mm)"
        else:
            try:
                utc = parsed.astimezone(UTC)
            except OverflowError:
                problem = "date-time out of range once converted to UTC"
            else:
                if utc.year >= EARLIEST_YEAR:
                    obj[name] = utc.isoformat()
                    continue
                problem = f"date-time before {EARLIEST_YEAR}: not an event's time"
        raise DecodeError(f"invalid {what} event: {prefix}{name}: {problem}", prefix + name)


def _parse_lowercase(value: str) -> datetime | None:
    """RFC 3339 allows ``t`` and ``z`` in lower case, which ``fromisoformat`` rejects."""
    if "t" not in value and "z" not in value:
        return None
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:
        return None


def _schema_version(dataschema: str | None, data: dict[str, Any]) -> int:
    """The version at the end of ``dataschema``, else guessed from the fields present."""
    if dataschema:
        known = _KNOWN_SCHEMAS.get(dataschema)
        if known is not None:
            return known
        tail = dataschema.rstrip("/").rpartition("/")[2]
        if tail.isascii() and tail.isdigit() and len(tail) <= 9:
            return int(tail)
    return 2 if "data_session_data_total" in data else 1


def _extra(obj: dict[str, Any], data: dict[str, Any]) -> dict[str, Any] | None:
    """Unknown envelope and ``data`` fields, or None (the usual case, checked first)."""
    if _ENVELOPE_FIELDS.issuperset(obj) and _DATA_FIELDS.issuperset(data):
        return None
    return {
        "envelope": {k: v for k, v in obj.items() if k not in _ENVELOPE_FIELDS},
        "data": {k: v for k, v in data.items() if k not in _DATA_FIELDS},
    }


def _sink_test(obj: dict[str, Any], event_type: str, meta: KinesisMeta | None) -> SinkTestEvent:
    _normalise_times(obj, _ENVELOPE_TIMES, "sink test", "")
    try:
        envelope: SinkTestEnvelope = _validate_sink_test(obj)
    except ValidationError as exc:
        reason, field = _describe(exc)
        raise DecodeError(f"invalid sink test event: {reason}", field) from None
    return SinkTestEvent(vendor=vendor_of(event_type), envelope=envelope, meta=meta)


def _other(obj: dict[str, Any], event_type: str, meta: KinesisMeta | None) -> OtherEvent:
    """Another product's event: only the CloudEvents attributes it must have are checked."""
    for name in CLOUDEVENT_REQUIRED:
        if obj.get(name).__class__ is not str:
            raise DecodeError(
                f"invalid CloudEvent of type {_shown(event_type)}: "
                f"envelope field {name!r} is {_what(obj, name)}",
                name,
            )
    event_id: str = obj["id"]
    return OtherEvent(type=event_type, id=event_id, meta=meta)


def _describe(exc: ValidationError) -> tuple[str, str | None]:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
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


def _what(obj: dict[str, Any], name: str) -> str:
    """How a field that should be a string is wrong: missing, null or another type."""
    if name not in obj:
        return "missing"
    value = obj[name]
    return "null" if value is None else f"a JSON {_type_name(value)}, not a string"


def _shown(text: str) -> str:
    """A type name for a reason: quoted, and cut short if it is long."""
    if len(text) <= _MAX_SHOWN_CHARS:
        return repr(text)
    return repr(text[:_MAX_SHOWN_CHARS]) + "..."
