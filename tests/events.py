"""Test data: Super SIM connection events in exactly the format they arrive in on the stream.

``make_event()`` returns one CloudEvent as a dict, ``make_record()`` the same as the bytes
of one Kinesis record. With no arguments they build the real ``data-session.updated``
sample (``shared/reference/samples/data-session-updated.json``); every other kind reuses
that SIM, network and data session so a test can follow one device through its session.

Overrides name a field and set it; ``drop`` removes fields. A name is an envelope key
(``type``, ``id``, ``source``, ``time``, ``dataschema``, ...) or else a ``data`` field;
``envelope__<name>`` adds a new envelope key. Nested values are reached with ``__``
(keyword arguments) or ``.`` (``drop``, ``fields``)::

    make_event("attachment.rejected", vendor="kore", error__code=83702)
    make_event(drop=("location", "network.sid"), imei=None, location__lat=1.5)
    make_event(fields={"data.network.mcc": "234"}, envelope__traceparent="00-...")
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final

import orjson

KINDS: Final = (
    "attachment.accepted",
    "attachment.rejected",
    "attachment.failed",
    "data-session.started",
    "data-session.updated",
    "data-session.ended",
    "data-session.failed",
)
VENDORS: Final = ("twilio", "kore")
USAGE_KINDS: Final = ("data-session.updated", "data-session.ended")

TWILIO_PREFIX: Final = "com.twilio.iot.supersim.connection."
KORE_PREFIX: Final = "com.kore.supersim.connection."
TWILIO_SCHEMA: Final = "https://events-schemas.twilio.com/SuperSim.ConnectionEvent/"
KORE_SCHEMA: Final = "https://events-schemas.korewireless.com/SuperSim.ConnectionEvent/"
ENVELOPE_KEYS: Final = frozenset(
    {"specversion", "type", "source", "id", "dataschema", "datacontenttype", "time", "data"}
)
CUMULATIVE_FIELDS: Final = (
    "data_session_data_download",
    "data_session_data_upload",
    "data_session_data_total",
)

# The real sample's identifiers (as found in a public integration's test data).
SAMPLE_EVENT_SID: Final = "EZeb42ec296e094786c6dd34aab7b15fac"
SIM: Final[Mapping[str, Any]] = {
    "account_sid": "ACe7ea554f7fc0fad65e689bb5899bb6c3",
    "sim_sid": "HS2f71995b834d803ff5376799ba59bd1d",
    "sim_iccid": "89883070000005381783",
    "sim_unique_name": "Zeblaze Thor 6 Android Watch",
    "fleet_sid": "HF925ae5b4af6aeb7d5034d3f4b09c78ce",
    "imsi": "732123200563187",
    "imei": "358600842867678",
    "rat_type": "4G LTE",
}
NETWORK: Final[Mapping[str, Any]] = {
    "iso_country": "US",
    "mnc": "260",
    "mcc": "310",
    "sid": "HWd46933be78a54c05b5c287ddeb9592f4",
    "friendly_name": "T-Mobile",
}
LOCATION: Final[Mapping[str, Any]] = {
    "lon": -118.5720773,
    "cell_id": "47322374",
    "lat": 34.166991,
    "lac": "15170",
}
SESSION: Final[Mapping[str, Any]] = {
    "apn": "super",
    "ip_address": "100.68.56.159",
    "data_session_sid": "PIc64fc7780f12ab694aad316d7b06f7a3",
    "data_session_start_time": "2022-12-11T06:15:01Z",
}
TIMESTAMP: Final = "2022-12-14T13:40:52Z"
UPDATE_START: Final = "2022-12-14T13:34:52Z"

# Error codes documented for these events; the messages are illustrative.
ERRORS: Final[Mapping[str, Mapping[str, Any]]] = {
    "attachment.rejected": {
        "code": 83705,
        "message": "Attachment Rejected Due To SIM In Inactive State",
    },
    "attachment.failed": {"code": 83700, "message": "Attachment Failed Due To Internal Error"},
    "data-session.failed": {
        "code": 83701,
        "message": "Data Session Establishment Failed Due To Internal Error",
    },
}
# Per-window and cumulative byte counts of the updated/ended events (the sample's are 0).
USAGE: Final[Mapping[str, Mapping[str, int]]] = {
    "data-session.updated": {
        "data_download": 0,
        "data_upload": 0,
        "data_total": 0,
        "data_session_data_download": 0,
        "data_session_data_upload": 0,
        "data_session_data_total": 0,
    },
    "data-session.ended": {
        "data_download": 120_034,
        "data_upload": 8_761,
        "data_total": 128_795,
        "data_session_data_download": 5_230_112,
        "data_session_data_upload": 401_227,
        "data_session_data_total": 5_631_339,
    },
}


def event_sid(kind: str, seq: int = 0) -> str:
    """A stable ``EZ`` + 32 hex SID per (kind, seq): the same event from both vendors shares it."""
    if kind == "data-session.updated" and seq == 0:
        return SAMPLE_EVENT_SID
    return "EZ" + hashlib.md5(f"{kind}/{seq}".encode()).hexdigest()


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
    if kind in ("data-session.started", *USAGE_KINDS):
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
    drop: Iterable[str] = (),
    fields: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """One connection event as published by ``vendor``, as a dict (see the module docstring).

    ``drop`` and overrides are applied before ``data_as_string`` turns ``data`` into a JSON
    string (an override of ``data`` that is already a string is left as it is).
    """
    data = make_data(kind, schema_version, seq)
    sid = data["event_sid"]
    event: dict[str, Any] = {
        "specversion": "1.0",
        "type": event_type(kind, vendor),
        "source": f"/v1/SuperSim/ConnectionEvents/{sid}" if vendor == "twilio" else "kore-events",
        "id": sid,
        "dataschema": _schema_base(vendor) + str(schema_version),
        "datacontenttype": "application/json",
        "time": TIMESTAMP.replace("Z", ".000Z"),
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
    """Events as JSON Lines (one record per line), as ``supersim-worker decode`` reads them."""
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
