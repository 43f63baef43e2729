"""Connection events in exactly the format they arrive in on the stream, for tests.

``make_event()`` returns one CloudEvent as a dict, ``make_record()`` the same as the bytes
of one Kinesis record, ``make_connection_event()`` the same decoded (what a handler gets).
With no arguments they build the real ``data-session.updated`` sample
(``shared/reference/samples/data-session-updated.json``); every other kind reuses that SIM,
network and data session, so a test can follow one device through its session.
``vendor="kore"`` builds KORE's envelope (``com.kore.supersim.connection.<kind>``, source
``kore-events``, KORE's schema host) around the same ``data``.

Shorthands set what tests vary most: ``sim``, ``fleet``, ``session`` (sids), ``at`` (the
event's time: ``data.timestamp``, the envelope's ``time``, and a usage window ending then),
``download`` / ``upload`` (a window's bytes) and ``error_code``. An event's sid follows its
kind, ``seq`` and the shorthands given: the same arguments build the same event, whatever
the vendor, so a KORE copy of a Twilio event is a duplicate, as during a migration.

Overrides name a field and set it; ``drop`` removes fields. A name is an envelope key
(``type``, ``id``, ``source``, ``time``, ``dataschema``, ...) or else a ``data`` field;
``envelope__<name>`` adds a new envelope key. Nested values are reached with ``__``
(keyword arguments) or ``.`` (``drop``, ``fields``)::

    make_event("attachment.rejected", vendor="kore", error_code=83702, fleet="HF...")
    make_event("data-session.ended", at="2024-03-01T10:00:00Z", download=5_000, upload=300)
    make_event(drop=("location", "network.sid"), imei=None, location__lat=1.5)
    make_event(fields={"data.network.mcc": "234"}, envelope__traceparent="00-...")
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from worker.events.decode import decode
from worker.events.records import ConnectionEvent, KinesisMeta
from worker.testing.samples import (
    CUMULATIVE_FIELDS,
    ENVELOPE_KEYS,
    ERROR_MESSAGES,
    ERRORS,
    KINDS,
    KORE_PREFIX,
    KORE_SCHEMA,
    LOCATION,
    NETWORK,
    SAMPLE_EVENT_SID,
    SESSION,
    SESSION_KINDS,
    SIM,
    TIMESTAMP,
    TWILIO_PREFIX,
    TWILIO_SCHEMA,
    UPDATE_INTERVAL,
    UPDATE_START,
    USAGE,
    USAGE_KINDS,
    VENDORS,
)


def event_sid(kind: str, seq: int = 0, identity: tuple[Any, ...] = ()) -> str:
    """A stable ``EZ`` + 32 hex SID per (kind, seq, identity): the same event from both
    vendors shares it. ``identity`` holds the shorthands a builder was given."""
    if kind == "data-session.updated" and seq == 0 and not identity:
        return SAMPLE_EVENT_SID
    text = f"{kind}/{seq}" + (f"/{identity!r}" if identity else "")
    return "EZ" + hashlib.md5(text.encode()).hexdigest()


def event_type(kind: str, vendor: str = "twilio") -> str:
    """The envelope ``type`` of a connection event of ``kind`` published by ``vendor``."""
    return _prefix(vendor) + kind


def make_data(
    kind: str = "data-session.updated", schema_version: int = 2, seq: int = 0
) -> dict[str, Any]:
    """The ``data`` object of a connection event (always with Twilio's ``event_type``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; pick one of {KINDS}")
    data: dict[str, Any] = {
        "event_sid": event_sid(kind, seq),
        "event_type": TWILIO_PREFIX + kind,
        "timestamp": TIMESTAMP,
        **SIM,
        "network": dict(NETWORK),
        "location": dict(LOCATION),
    }
    if kind in ERRORS:
        data["error"] = dict(ERRORS[kind])
    if kind == "attachment.rejected":
        data["imei"] = None
        data["location"] = None
    if kind.startswith("data-session."):
        data["apn"] = SESSION["apn"]
    if kind in SESSION_KINDS:
        data.update(SESSION)
    if kind in USAGE_KINDS:
        data["data_session_update_start_time"] = UPDATE_START
        data["data_session_update_end_time"] = TIMESTAMP
        data.update(USAGE[kind])
    if kind == "data-session.ended":
        data["data_session_end_time"] = TIMESTAMP
    if schema_version < 2:
        for name in CUMULATIVE_FIELDS:
            data.pop(name, None)
    return data


def make_event(
    kind: str = "data-session.updated",
    vendor: str = "twilio",
    schema_version: int = 2,
    data_as_string: bool = False,
    *,
    seq: int = 0,
    sim: str | None = None,
    fleet: str | None = None,
    session: str | None = None,
    at: datetime | str | None = None,
    download: int | None = None,
    upload: int | None = None,
    error_code: int | None = None,
    drop: Iterable[str] = (),
    fields: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One connection event as published by ``vendor``, as a dict (see the module docstring).

    Shorthands: ``sim``, ``fleet``, ``session`` set ``sim_sid``, ``fleet_sid`` and (on
    data-session kinds) ``data_session_sid``. ``at`` (an aware datetime or RFC 3339) is the
    event's time; on data-session kinds the session then starts at the start of that UTC
    day (override ``data_session_start_time`` for one crossing midnight) and a usage window
    ends at ``at`` (6 minutes long, at most since the start), as does an ended session.
    ``download`` / ``upload`` set a usage window's bytes and ``data_total``; the session's
    cumulative totals (schema v2) become the window's, as for a one-window session.
    ``error_code`` sets ``error`` (a known code gets its documented message).

    The shorthands are applied first, then ``drop``, ``fields`` and the overrides; then
    ``data_as_string`` turns ``data`` into a JSON string (an override of ``data`` that is
    already a string is left as it is).
    """
    shorthands = (sim, fleet, session, _iso(at), download, upload, error_code)
    identity = shorthands if any(value is not None for value in shorthands) else ()
    data = make_data(kind, schema_version, seq)
    data["event_sid"] = sid = event_sid(kind, seq, identity)
    _apply_shorthands(data, kind, sim, fleet, session, at, download, upload, error_code)
    event: dict[str, Any] = {
        "specversion": "1.0",
        "type": event_type(kind, vendor),
        "source": _source(vendor, sid),
        "id": sid,
        "dataschema": _schema_base(vendor) + str(schema_version),
        "datacontenttype": "application/json",
        "time": data["timestamp"].replace("Z", ".000Z"),
        "data": data,
    }
    for path in drop:
        _drop(event, _split(path))
    for path, value in (fields or {}).items():
        _set(event, _split(path), value)
    for name, value in overrides.items():
        _set(event, _split(name), value)
    if data_as_string and isinstance(event.get("data"), dict):
        event["data"] = orjson.dumps(event["data"]).decode()
    return event


def make_record(
    kind: str = "data-session.updated",
    vendor: str = "twilio",
    schema_version: int = 2,
    data_as_string: bool = False,
    **kwargs: Any,
) -> bytes:
    """``make_event(...)`` as the bytes of one Kinesis record (compact UTF-8 JSON)."""
    return orjson.dumps(make_event(kind, vendor, schema_version, data_as_string, **kwargs))


def make_connection_event(
    kind: str = "data-session.updated",
    vendor: str = "twilio",
    schema_version: int = 2,
    *,
    meta: KinesisMeta | None = None,
    **kwargs: Any,
) -> ConnectionEvent:
    """``make_event(...)`` decoded, as a handler receives it (``meta``: where it came from;
    the runner fills it in when None)."""
    return as_connection_event(make_record(kind, vendor, schema_version, **kwargs), meta)


def as_connection_event(raw: bytes, meta: KinesisMeta | None = None) -> ConnectionEvent:
    """Decode one record that must be a connection event (ValueError otherwise)."""
    decoded = decode(raw, meta)
    if not isinstance(decoded, ConnectionEvent):
        raise ValueError(f"not a connection event: a {decoded.category} event")
    return decoded


Item = ConnectionEvent | bytes | Mapping[str, Any]
"""What the runner can be fed: a decoded event, a record's bytes or a CloudEvent dict."""


def connection_event_of(item: Item) -> ConnectionEvent | None:
    """The connection event of any ``Item``; None for a sink test event or another
    product's CloudEvent (which the consumer skips). A bad record raises DecodeError."""
    if isinstance(item, ConnectionEvent):
        return item
    decoded = decode(item if isinstance(item, bytes) else orjson.dumps(item))
    return decoded if isinstance(decoded, ConnectionEvent) else None


def in_other_envelope(event: Mapping[str, Any]) -> dict[str, Any]:
    """The same connection event as the other vendor publishes it (Twilio <-> KORE): the
    same ``data`` and ``id``, the other ``type`` prefix, ``source`` and schema host."""
    etype = str(event["type"])
    vendor = "twilio" if etype.startswith(TWILIO_PREFIX) else "kore"
    other = "kore" if vendor == "twilio" else "twilio"
    kind = etype.rpartition("supersim.connection.")[2]
    version = str(event.get("dataschema") or "2").rpartition("/")[2]
    out = dict(event)
    out["type"] = event_type(kind, other)
    out["source"] = _source(other, str(event["id"]))
    out["dataschema"] = _schema_base(other) + version
    return out


def twin(event: ConnectionEvent, meta: KinesisMeta | None = None) -> ConnectionEvent:
    """A decoded event's copy in the other vendor's envelope (a duplicate of it)."""
    return as_connection_event(orjson.dumps(in_other_envelope(to_dict(event))), meta)


def to_dict(event: ConnectionEvent) -> dict[str, Any]:
    """A decoded event back as a CloudEvent dict, unknown fields included."""
    out: dict[str, Any] = event.envelope.model_dump(mode="json", exclude_unset=True)
    extra = event.extra or {}
    out.update(extra.get("envelope", {}))
    out["data"].update(extra.get("data", {}))
    return out


def make_sink_test_event(vendor: str = "twilio", data_as_string: bool = True) -> dict[str, Any]:
    """The event a sink sends when it is created or tested: not a connection event."""
    test_id = "b7f7f5e2-3c5d-4a5e-9a1b-2c3d4e5f6a7b"
    data: Any = {"test_id": test_id}
    if data_as_string:
        data = orjson.dumps(data).decode()
    if vendor == "twilio":
        return {
            "specversion": "1.0",
            "type": "com.twilio.eventstreams.test-event",
            "source": "Sink",
            "id": SIM["account_sid"],
            "dataschema": None,
            "datacontenttype": "application/json",
            "time": TIMESTAMP,
            "data": data,
        }
    return {
        "specversion": "1.0",
        "type": "com.kore.eventstreams.test.event",
        "source": "kore-events",
        "id": "5f0c2b1e-8d4a-4e0b-9f3a-1c2d3e4f5a6b",
        "datacontenttype": "application/json",
        "time": TIMESTAMP,
        "data": data,
    }


def make_other_event(etype: str = "com.twilio.messaging.message.delivered") -> dict[str, Any]:
    """A well-formed CloudEvent of another product, as a stream shared with it carries."""
    return {
        "specversion": "1.0",
        "type": etype,
        "source": "/2010-04-01/Accounts/AC00000000000000000000000000000000/Messages/SM0",
        "id": "EZ00000000000000000000000000000000",
        "dataschema": "https://events-schemas.twilio.com/Messaging.MessageStatus/5",
        "datacontenttype": "application/json",
        "time": TIMESTAMP,
        "data": {"messageStatus": "DELIVERED"},
    }


def to_record(event: Mapping[str, Any]) -> bytes:
    """Any event dict as the bytes of one Kinesis record."""
    return orjson.dumps(event)


def to_jsonl(events: Iterable[Mapping[str, Any]]) -> bytes:
    """Events as JSON Lines (one record per line), as ``supersim-worker replay`` reads them."""
    return b"".join(orjson.dumps(event) + b"\n" for event in events)


def all_kinds(vendor: str = "twilio", **kwargs: Any) -> list[dict[str, Any]]:
    """One event of every kind from ``vendor``."""
    return [make_event(kind, vendor, **kwargs) for kind in KINDS]


# --- helpers ---------------------------------------------------------------------------------


def _prefix(vendor: str) -> str:
    if vendor == "twilio":
        return TWILIO_PREFIX
    if vendor == "kore":
        return KORE_PREFIX
    raise ValueError(f"unknown vendor {vendor!r}; pick one of {VENDORS}")


def _schema_base(vendor: str) -> str:
    return TWILIO_SCHEMA if vendor == "twilio" else KORE_SCHEMA


def _source(vendor: str, sid: str) -> str:
    return f"/v1/SuperSim/ConnectionEvents/{sid}" if vendor == "twilio" else "kore-events"


def _moment(at: datetime | str) -> datetime:
    moment = datetime.fromisoformat(at) if isinstance(at, str) else at
    if moment.tzinfo is None:
        raise ValueError(f"at must be an aware datetime or carry an offset, got {at!r}")
    return moment.astimezone(UTC).replace(microsecond=0)


def _iso(at: datetime | str | None) -> str | None:
    return None if at is None else _moment(at).strftime("%Y-%m-%dT%H:%M:%SZ")


def _apply_shorthands(
    data: dict[str, Any],
    kind: str,
    sim: str | None,
    fleet: str | None,
    session: str | None,
    at: datetime | str | None,
    download: int | None,
    upload: int | None,
    error_code: int | None,
) -> None:
    if sim is not None:
        data["sim_sid"] = sim
    if fleet is not None:
        data["fleet_sid"] = fleet
    if session is not None:
        if kind not in SESSION_KINDS:
            raise ValueError(f"session: a {kind} event belongs to no data session")
        data["data_session_sid"] = session
    if at is not None:
        moment = _moment(at)
        data["timestamp"] = _iso(moment)
        start = moment.replace(hour=0, minute=0, second=0)  # a session starts at midnight
        if kind in SESSION_KINDS:
            data["data_session_start_time"] = _iso(start)
        if kind in USAGE_KINDS:
            data["data_session_update_start_time"] = _iso(max(start, moment - UPDATE_INTERVAL))
            data["data_session_update_end_time"] = data["timestamp"]
        if kind == "data-session.ended":
            data["data_session_end_time"] = data["timestamp"]
    if download is not None or upload is not None:
        if kind not in USAGE_KINDS:
            raise ValueError(f"download/upload: a {kind} event reports no bytes")
        down = data["data_download"] = data["data_download"] if download is None else download
        up = data["data_upload"] = data["data_upload"] if upload is None else upload
        data["data_total"] = down + up
        if "data_session_data_total" in data:
            data.update(
                data_session_data_download=down,
                data_session_data_upload=up,
                data_session_data_total=down + up,
            )
    if error_code is not None:
        data["error"] = {"code": error_code, "message": ERROR_MESSAGES.get(error_code, "Error")}


def _split(path: str) -> list[str]:
    """``location__lat`` → ["data", "location", "lat"]; envelope keys stay as they are, and
    ``envelope__x`` names a key ``x`` of the envelope that the real format does not have."""
    parts = path.replace("__", ".").split(".")
    if parts[0] == "envelope" and len(parts) > 1:
        return parts[1:]
    if parts[0] not in ENVELOPE_KEYS:
        parts.insert(0, "data")
    return parts


def _parent(event: dict[str, Any], parts: list[str], create: bool) -> dict[str, Any] | None:
    node: Any = event
    for part in parts[:-1]:
        if isinstance(node, str):  # data already a JSON string: nothing nested to reach
            return None
        child = node.get(part)
        if not isinstance(child, dict):
            if not create:
                return None
            child = node[part] = {}
        node = child
    return node if isinstance(node, dict) else None


def _set(event: dict[str, Any], parts: list[str], value: Any) -> None:
    parent = _parent(event, parts, create=True)
    if parent is None:
        raise ValueError(f"cannot set {'.'.join(parts)}: its parent is not an object")
    parent[parts[-1]] = copy.deepcopy(value)


def _drop(event: dict[str, Any], parts: list[str]) -> None:
    parent = _parent(event, parts, create=False)
    if parent is not None:
        parent.pop(parts[-1], None)
