"""``worker.events.decode.decode``: every event kind, vendor, ``data`` form and schema version decodes
to typed records; every kind of bad input fails with a ``DecodeError`` naming the field."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from events import (
    CUMULATIVE_FIELDS,
    KINDS,
    SIM,
    TWILIO_PREFIX,
    USAGE_KINDS,
    VENDORS,
    make_event,
    make_other_event,
    make_record,
    make_sink_test_event,
    to_record,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import DecodeError
from worker.events.decode import decode
from worker.events.records import (
    MAX_RECORD_BYTES,
    ConnectionData,
    ConnectionEvent,
    EventKind,
    KinesisMeta,
    OtherEvent,
    SinkTestEvent,
    Vendor,
)

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "samples"
USAGE_FIELDS = (
    "data_session_sid",
    "data_session_start_time",
    "data_session_update_start_time",
    "data_session_update_end_time",
    "data_download",
    "data_upload",
    "data_total",
)
TIME_FIELDS = (
    "timestamp",
    "data_session_start_time",
    "data_session_end_time",
    "data_session_update_start_time",
    "data_session_update_end_time",
)
PII = (SIM["imsi"], SIM["sim_iccid"], SIM["imei"])
META = KinesisMeta(
    "shardId-000000000001", "49590338271490256608559692538361571095921575989136588898", "pk"
)


def connection(raw: bytes, meta: KinesisMeta | None = None) -> ConnectionEvent:
    event = decode(raw, meta)
    assert isinstance(event, ConnectionEvent), event
    return event


def failure(raw: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(raw)
    reason = info.value.reason
    for value in PII:
        assert value not in reason, f"reason echoes personal data: {reason}"
    return info.value


def is_utc(value: datetime) -> bool:
    """Aware and in UTC (pydantic's own UTC tzinfo or ``datetime.UTC``)."""
    return value.utcoffset() == timedelta(0) and value.tzname() == "UTC"


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert is_utc(value)


# --- every kind x vendor x data form x schema version ------------------------------------


@pytest.mark.parametrize("schema_version", [1, 2])
@pytest.mark.parametrize("data_as_string", [False, True], ids=["data-object", "data-string"])
@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_vendor_form_and_version_decodes(
    kind: str, vendor: str, data_as_string: bool, schema_version: int
) -> None:
    """Each of the 7 kinds decodes from both vendors, with data as object or string, v1 and v2."""
    raw = make_record(kind, vendor, schema_version, data_as_string)
    event = connection(raw)
    expected = make_event(kind, vendor, schema_version)["data"]
    assert event.kind is EventKind(kind)
    assert event.vendor is Vendor(vendor)
    assert event.schema_version == schema_version
    assert event.event_sid == expected["event_sid"] == event.envelope.id
    assert event.category == "connection"
    assert event.extra is None
    assert event.meta is None
    data = event.data
    assert data.sim_iccid == expected["sim_iccid"]
    assert data.event_type.endswith(f"supersim.connection.{kind}")
    assert_utc(data.timestamp)
    assert_utc(event.envelope.time)
    for name in TIME_FIELDS:
        value = getattr(data, name)
        assert (value is None) == (name not in expected)
        if value is not None:
            assert_utc(value)
    if kind in USAGE_KINDS:
        for name in ("data_download", "data_upload", "data_total"):
            assert getattr(data, name) == expected[name]
        for name in CUMULATIVE_FIELDS:
            assert getattr(data, name) == (expected[name] if schema_version == 2 else None)
    if "error" in expected:
        assert data.error is not None
        assert data.error.code == expected["error"]["code"]


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("data-session-updated.json", EventKind.DATA_SESSION_UPDATED),
        ("attachment-rejected.json", EventKind.ATTACHMENT_REJECTED),
    ],
)
def test_real_samples_decode(name: str, kind: EventKind) -> None:
    """The reference samples, pretty-printed as published, decode to connection events."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"reference sample {name} not present")
    event = connection(path.read_bytes())
    assert event.kind is kind
    assert event.vendor is Vendor.TWILIO
    assert event.schema_version == 2


def test_factory_default_is_the_real_sample() -> None:
    """``make_event()`` with no arguments reproduces the real data-session.updated sample."""
    path = SAMPLES / "data-session-updated.json"
    if not path.is_file():
        pytest.skip("reference sample not present")
    assert make_event() == orjson.loads(path.read_bytes())


def test_kore_event_keeps_twilio_data_event_type() -> None:
    """A KORE envelope around data whose event_type is Twilio's decodes as KORE."""
    event = connection(make_record("data-session.ended", "kore"))
    assert event.vendor is Vendor.KORE
    assert event.envelope.source == "kore-events"
    assert event.data.event_type.startswith("com.twilio.")
    assert event.data.data_session_end_time == datetime(2022, 12, 14, 13, 40, 52, tzinfo=UTC)


def test_same_event_from_both_vendors_shares_its_sid() -> None:
    """The same event published by Twilio and KORE carries one event_sid (the de-dup key)."""
    twilio = connection(make_record("data-session.updated", "twilio", seq=3))
    kore = connection(make_record("data-session.updated", "kore", seq=3))
    assert twilio.event_sid == kore.event_sid
    assert twilio.data == kore.data


# --- optional fields ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["null", "omitted"])
def test_location_may_be_null_or_omitted(how: str) -> None:
    """Without a location (null or absent), the event decodes with data.location None."""
    event = make_event(location=None) if how == "null" else make_event(drop=("location",))
    assert connection(to_record(event)).data.location is None


def test_location_fields_are_typed() -> None:
    """A location has string cell_id/lac and float lat/lon."""
    location = connection(make_record("attachment.accepted")).data.location
    assert location is not None
    assert (location.cell_id, location.lac) == ("47322374", "15170")
    assert (location.lat, location.lon) == (34.166991, -118.5720773)


def test_location_integer_coordinates_are_accepted_as_floats() -> None:
    """A whole-number latitude (JSON 34) is a valid number and decodes as 34.0."""
    location = connection(make_record(location__lat=34)).data.location
    assert location is not None
    assert location.lat == 34.0
    assert isinstance(location.lat, float)


@pytest.mark.parametrize("how", ["null", "omitted"])
def test_imei_may_be_null_or_omitted(how: str) -> None:
    """A null or missing IMEI decodes as None."""
    event = make_event(imei=None) if how == "null" else make_event(drop=("imei",))
    assert connection(to_record(event)).data.imei is None


def test_optional_descriptive_fields_may_all_be_absent() -> None:
    """Only the six required data fields are needed for an attachment event."""
    optional = ("sim_unique_name", "fleet_sid", "imsi", "imei", "rat_type", "network", "location")
    event = connection(make_record("attachment.accepted", drop=optional))
    assert event.data.network is None
    assert event.data.sim_unique_name is None


@pytest.mark.parametrize(
    "kind", ["attachment.rejected", "attachment.failed", "data-session.failed"]
)
def test_error_is_decoded(kind: str) -> None:
    """Rejected and failed events carry their error code and message."""
    error = connection(make_record(kind)).data.error
    assert error is not None
    assert error.code in (83700, 83701, 83702, 83703, 83704, 83705)
    assert error.message


def test_error_with_diameter_message_and_extra_keys() -> None:
    """An error's unknown keys are kept in its model_extra; the message may be a Diameter code."""
    error_value = {"code": 83702, "message": "DIAMETER_ERROR_ROAMING_NOT_ALLOWED", "more_info": "x"}
    error = connection(make_record("attachment.rejected", error=error_value)).data.error
    assert error is not None
    assert error.code == 83702
    assert error.message == "DIAMETER_ERROR_ROAMING_NOT_ALLOWED"
    assert error.model_extra == {"more_info": "x"}


def test_error_without_message() -> None:
    """An error needs only its code."""
    error = connection(make_record("attachment.failed", drop=("error.message",))).data.error
    assert error is not None
    assert error.message is None


def test_data_modifier_blocked() -> None:
    """data_modifier 'blocked' (SIM at its data limit) is decoded."""
    event = connection(make_record("data-session.updated", data_modifier="blocked"))
    assert event.data.data_modifier == "blocked"


def test_data_modifier_absent_is_none() -> None:
    """Without a data limit reached, data_modifier is None."""
    assert connection(make_record()).data.data_modifier is None


def test_data_session_failed_needs_no_session_sid() -> None:
    """A failed data session never got a data_session_sid; that is valid."""
    event = connection(make_record("data-session.failed"))
    assert event.data.data_session_sid is None


def test_attachment_event_with_session_fields_is_accepted() -> None:
    """Fields of other kinds on an attachment event are tolerated, not required."""
    event = connection(make_record("attachment.accepted", data_session_sid="PI0"))
    assert event.data.data_session_sid == "PI0"


# --- unknown fields, metadata, schema version -------------------------------------------------


def test_unknown_fields_are_kept_in_extra() -> None:
    """Unknown envelope and data fields land in event.extra, by place, and do not fail."""
    raw = make_record(
        envelope__traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        fields={"data.sim_tags": ["pump", "north"], "data.future": {"a": 1}},
    )
    event = connection(raw)
    assert event.extra == {
        "envelope": {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "data": {"sim_tags": ["pump", "north"], "future": {"a": 1}},
    }


def test_unknown_data_field_only_in_string_data() -> None:
    """Unknown fields inside a data string are kept too."""
    event = connection(make_record(data_as_string=True, new_counter=5))
    assert event.extra == {"envelope": {}, "data": {"new_counter": 5}}


def test_unknown_nested_fields_are_kept_on_the_nested_model() -> None:
    """Unknown network/location keys are kept in those models' model_extra."""
    event = connection(make_record(network__plmn="310260", location__accuracy=150))
    assert event.data.network is not None
    assert event.data.network.model_extra == {"plmn": "310260"}
    assert event.data.location is not None
    assert event.data.location.model_extra == {"accuracy": 150}
    assert event.extra is None


def test_kinesis_meta_is_carried() -> None:
    """The KinesisMeta passed in is attached to every kind of decoded event."""
    assert connection(make_record(), META).meta is META
    assert decode(to_record(make_sink_test_event()), META).meta is META
    assert decode(to_record(make_other_event()), META).meta is META


@pytest.mark.parametrize(
    ("dataschema", "version"),
    [
        ("https://events-schemas.twilio.com/SuperSim.ConnectionEvent/3", 3),
        ("https://events-schemas.korewireless.com/SuperSim.ConnectionEvent/1/", 1),
        ("urn:example:no-version", 2),
        ("https://example.com/schema/\u00b2", 2),
        ("https://example.com/schema/" + "9" * 5000, 2),
        (None, 2),
    ],
)
def test_schema_version_from_dataschema_or_fields(dataschema: str | None, version: int) -> None:
    """The version is the dataschema's last path segment, else 2 when cumulative fields exist."""
    assert connection(make_record(dataschema=dataschema)).schema_version == version


def test_schema_version_guessed_1_without_cumulative_fields() -> None:
    """Without dataschema and without the v2 fields, the event is taken as v1."""
    event = connection(make_record(schema_version=1, drop=("dataschema",)))
    assert event.schema_version == 1


def test_optional_envelope_fields_may_be_absent() -> None:
    """dataschema, datacontenttype and time are optional in the envelope."""
    event = connection(make_record(drop=("dataschema", "datacontenttype", "time")))
    assert event.envelope.time is None


# --- times ------------------------------------------------------------------------------------

T = datetime(2022, 12, 14, 13, 40, 52, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2022-12-14T13:40:52Z", T),
        ("2022-12-14T13:40:52.000Z", T),
        ("2022-12-14T13:40:52+00:00", T),
        ("2022-12-14T13:40:52-00:00", T),
        ("2022-12-14T15:40:52+02:00", T),
        ("2022-12-14T08:10:52-05:30", T),
        ("2022-12-14T13:40:52.123Z", T.replace(microsecond=123000)),
        ("2022-12-14T13:40:52.1234567Z", T.replace(microsecond=123456)),
        ("2022-12-14T15:40:52.1234567+02:00", T.replace(microsecond=123456)),
        ("2022-12-14t13:40:52z", T),
        ("2022-12-14 13:40:52Z", T),
        ("2022-12-15T00:10:52+10:30", T),
    ],
)
@pytest.mark.parametrize("field", ["time", "timestamp", "data_session_update_end_time"])
def test_times_parse_to_aware_utc(field: str, text: str, expected: datetime) -> None:
    """RFC 3339 times with Z or any offset and 0-7 fractional digits become aware UTC."""
    event = connection(make_record(**{field: text}))
    value = event.envelope.time if field == "time" else getattr(event.data, field)
    assert value == expected
    assert_utc(value)
    assert value.utcoffset() == timedelta(0)


def test_time_in_data_string_is_parsed() -> None:
    """Times inside a data string are parsed like those in a data object."""
    event = connection(make_record(data_as_string=True, timestamp="2022-12-14T15:40:52+02:00"))
    assert event.data.timestamp == T
    assert_utc(event.data.timestamp)


# --- sink test events and other CloudEvents ---------------------------------------------------


@pytest.mark.parametrize("data_as_string", [True, False], ids=["data-string", "data-object"])
@pytest.mark.parametrize("vendor", VENDORS)
def test_sink_test_events_are_sink_test_events(vendor: str, data_as_string: bool) -> None:
    """Twilio's and KORE's sink test events decode to SinkTestEvent, not to an error."""
    event = decode(to_record(make_sink_test_event(vendor, data_as_string)))
    assert isinstance(event, SinkTestEvent)
    assert event.vendor is Vendor(vendor)
    assert event.category == "sink_test"
    assert_utc(event.envelope.time)
    data = orjson.loads(event.envelope.data) if data_as_string else event.envelope.data
    assert set(data) == {"test_id"}


def test_sink_test_event_without_time() -> None:
    """A sink test event needs no time."""
    raw = to_record({k: v for k, v in make_sink_test_event().items() if k != "time"})
    assert isinstance(decode(raw), SinkTestEvent)


def test_sink_test_event_missing_id_is_an_error() -> None:
    """A sink test event lacking its id is malformed."""
    raw = to_record({k: v for k, v in make_sink_test_event().items() if k != "id"})
    error = failure(raw)
    assert "invalid sink test event" in error.reason
    assert error.field == "id"


def test_sink_test_event_with_bad_time_is_an_error() -> None:
    """A sink test event's time must be an RFC 3339 date-time."""
    error = failure(to_record(make_sink_test_event() | {"time": "soon"}))
    assert error.field == "time"


@pytest.mark.parametrize(
    "etype",
    [
        "com.twilio.messaging.message.delivered",
        "com.kore.connectivity.usage.daily",
        "com.twilio.iot.supersim.sms.received",
    ],
)
def test_other_cloudevents_are_other_events(etype: str) -> None:
    """A well-formed CloudEvent of another type decodes to OtherEvent with its type and id."""
    event = decode(to_record(make_other_event(etype)))
    assert isinstance(event, OtherEvent)
    assert event.type == etype
    assert event.id == "EZ00000000000000000000000000000000"
    assert event.category == "other"


@pytest.mark.parametrize("name", ["specversion", "id", "source"])
def test_other_event_without_required_attribute_is_an_error(name: str) -> None:
    """An object with a type but lacking a required CloudEvents attribute is not an event."""
    event = make_other_event()
    del event[name]
    error = failure(to_record(event))
    assert error.field == name
    assert f"'{name}' is missing" in error.reason


# --- bad input -------------------------------------------------------------------------------

VALID = make_event("data-session.updated")


def mutated(**overrides: Any) -> bytes:
    return make_record("data-session.updated", **overrides)


# (id, record, substring of the reason, field) for failures before field validation.
BAD_RECORDS: list[tuple[str, bytes, str, str | None]] = [
    ("not-utf8", b'{"type": "\xff\xfe"}', "not UTF-8 (invalid byte at offset 10)", None),
    ("latin1", '{"a": "é"}'.encode("latin-1"), "not UTF-8", None),
    ("not-json", b'{"type": "com.twilio.', "not JSON", None),
    ("empty", b"", "not JSON", None),
    ("blank", b"   \n", "not JSON", None),
    ("trailing-garbage", to_record(VALID) + b"}", "not JSON", None),
    ("two-records", to_record(VALID) + b"\n" + to_record(VALID), "not JSON", None),
    ("nan", b'{"type": NaN}', "not JSON", None),
    ("array", b"[" + to_record(VALID) + b"]", "record is a JSON array", None),
    ("string", b'"hello"', "record is a JSON string", None),
    ("number", b"42", "record is a JSON number", None),
    ("null", b"null", "record is a JSON null", None),
    ("boolean", b"true", "record is a JSON boolean", None),
    ("oversized", mutated(padding="x" * MAX_RECORD_BYTES), "over the 1 MiB Kinesis record", None),
    ("no-type", to_record({"specversion": "1.0", "id": "x"}), "'type' is missing", "type"),
    ("type-null", mutated(type=None), "'type' is null", "type"),
    ("type-number", mutated(type=7), "'type' is a JSON number, not a string", "type"),
    ("type-object", mutated(type={"a": 1}), "'type' is a JSON object", "type"),
    ("unknown-kind", mutated(type=TWILIO_PREFIX + "sim.exploded"), "unknown connection", "type"),
    ("data-missing", mutated(drop=("data",)), "'data' is missing, expected an object", "data"),
    ("data-null", mutated(data=None), "'data' is a JSON null, expected an object", "data"),
    ("data-array", mutated(data=[1]), "'data' is a JSON array, expected an object", "data"),
    ("data-number", mutated(data=3), "'data' is a JSON number", "data"),
    ("data-string-not-json", mutated(data="{oops"), "'data' is a string that is not JSON", "data"),
    ("data-string-array", mutated(data="[]"), "'data' is a JSON array", "data"),
    ("data-string-string", mutated(data='"x"'), "'data' is a JSON string", "data"),
    (
        "download-beyond-64-bits",
        mutated(data_download=12345).replace(b":12345,", b":" + b"9" * 30 + b","),
        "data.data_download: Input should be a valid integer",
        "data.data_download",
    ),
    (
        "kind-mismatch",
        mutated(event_type=TWILIO_PREFIX + "data-session.ended"),
        "envelope type is data-session.updated but data.event_type is",
        "data.event_type",
    ),
    (
        "kind-mismatch-vendorless",
        mutated(event_type="xdata-session.updated"),
        "envelope type is data-session.updated",
        "data.event_type",
    ),
]
BAD_RECORDS += [
    (
        f"{kind}-lacks-{name}",
        make_record(kind, drop=(name,)),
        f"{kind} event lacks data.{name}",
        f"data.{name}",
    )
    for kind in USAGE_KINDS
    for name in USAGE_FIELDS
]
BAD_RECORDS += [
    (
        f"{kind}-null-{name}",
        make_record(kind, **{name: None}),
        f"{kind} event lacks data.{name}",
        f"data.{name}",
    )
    for kind in USAGE_KINDS
    for name in ("data_download", "data_total")
]
BAD_RECORDS += [
    (
        f"started-lacks-{name}",
        make_record("data-session.started", drop=(name,)),
        f"data-session.started event lacks data.{name}",
        f"data.{name}",
    )
    for name in ("data_session_sid", "data_session_start_time")
]

REQUIRED = "Field required"
STRING = "Input should be a valid string"
INTEGER = "Input should be a valid integer"
NUMBER = "Input should be a valid number"
NON_NEGATIVE = "Input should be greater than or equal to 0"
OBJECT = "Input should be a valid dictionary"
DATETIME = "Input should be an RFC 3339 date-time string"
RFC3339 = "not an RFC 3339 date-time"
NO_OFFSET = "an RFC 3339 date-time needs a UTC offset"
OUT_OF_RANGE = "date-time out of range"
BEFORE_1970 = "date-time before 1970: not an event's time"

# (id, overrides of the valid data-session.updated event, field, message)
FIELD_ERRORS: list[tuple[str, dict[str, Any], str, str]] = [
    ("specversion-missing", {"drop": ("specversion",)}, "specversion", REQUIRED),
    ("source-missing", {"drop": ("source",)}, "source", REQUIRED),
    ("id-missing", {"drop": ("id",)}, "id", REQUIRED),
    ("id-number", {"id": 5}, "id", STRING),
    ("dataschema-number", {"dataschema": 2}, "dataschema", STRING),
    ("download-string", {"data_download": "120"}, "data.data_download", INTEGER),
    ("download-float", {"data_download": 120.5}, "data.data_download", INTEGER),
    ("download-whole-float", {"data_download": 120.0}, "data.data_download", INTEGER),
    ("download-bool", {"data_download": True}, "data.data_download", INTEGER),
    ("download-object", {"data_download": {"bytes": 1}}, "data.data_download", INTEGER),
    ("download-negative", {"data_download": -1}, "data.data_download", NON_NEGATIVE),
    ("upload-negative", {"data_upload": -5}, "data.data_upload", NON_NEGATIVE),
    ("total-negative", {"data_total": -5}, "data.data_total", NON_NEGATIVE),
    (
        "cumulative-negative",
        {"data_session_data_total": -1},
        "data.data_session_data_total",
        NON_NEGATIVE,
    ),
    (
        "cumulative-string",
        {"data_session_data_upload": "0"},
        "data.data_session_data_upload",
        INTEGER,
    ),
    (
        "cumulative-float",
        {"data_session_data_download": 1.5},
        "data.data_session_data_download",
        INTEGER,
    ),
    ("sim-sid-number", {"sim_sid": 12}, "data.sim_sid", STRING),
    ("iccid-number", {"sim_iccid": 8988307000000538}, "data.sim_iccid", STRING),
    ("imsi-array", {"imsi": [SIM["imsi"]]}, "data.imsi", STRING),
    ("network-string", {"network": "T-Mobile"}, "data.network", OBJECT),
    ("mcc-number", {"network__mcc": 310}, "data.network.mcc", STRING),
    ("location-array", {"location": [1, 2]}, "data.location", OBJECT),
    ("lat-string", {"location__lat": "34.1"}, "data.location.lat", NUMBER),
    ("lat-bool", {"location__lat": True}, "data.location.lat", NUMBER),
    ("cell-id-number", {"location__cell_id": 47322374}, "data.location.cell_id", STRING),
    ("error-code-string", {"error": {"code": "83705"}}, "data.error.code", INTEGER),
    ("error-code-missing", {"error": {"message": "x"}}, "data.error.code", REQUIRED),
    ("modifier-bool", {"data_modifier": True}, "data.data_modifier", STRING),
    ("timestamp-number", {"timestamp": 1670000000}, "data.timestamp", DATETIME),
    ("timestamp-null", {"timestamp": None}, "data.timestamp", DATETIME),
    ("timestamp-digits", {"timestamp": "1670000000"}, "data.timestamp", RFC3339),
    ("timestamp-words", {"timestamp": "yesterday"}, "data.timestamp", RFC3339),
    ("timestamp-empty", {"timestamp": ""}, "data.timestamp", RFC3339),
    ("timestamp-bad-month", {"timestamp": "2022-13-14T13:40:52Z"}, "data.timestamp", RFC3339),
    ("timestamp-leap-hour", {"timestamp": "2022-12-14T24:00:00Z"}, "data.timestamp", RFC3339),
    ("timestamp-no-offset", {"timestamp": "2022-12-14T13:40:52"}, "data.timestamp", NO_OFFSET),
    ("timestamp-date-only", {"timestamp": "2022-12-14"}, "data.timestamp", NO_OFFSET),
    (
        "timestamp-overflow",
        {"timestamp": "9999-12-31T23:59:59-10:00"},
        "data.timestamp",
        OUT_OF_RANGE,
    ),
    ("timestamp-year-999", {"timestamp": "0999-01-01T00:00:00Z"}, "data.timestamp", BEFORE_1970),
    ("timestamp-1969", {"timestamp": "1969-12-31T23:59:59Z"}, "data.timestamp", BEFORE_1970),
    (
        "timestamp-1969-in-utc",
        {"timestamp": "1970-01-01T00:30:00+01:00"},
        "data.timestamp",
        BEFORE_1970,
    ),
    (
        "start-time-1900",
        {"data_session_start_time": "1900-01-01T00:00:00Z"},
        "data.data_session_start_time",
        BEFORE_1970,
    ),
    (
        "timestamp-underflow",
        {"timestamp": "0001-01-01T00:00:00+10:00"},
        "data.timestamp",
        OUT_OF_RANGE,
    ),
    (
        "start-time-naive",
        {"data_session_start_time": "2022-12-11T06:15:01"},
        "data.data_session_start_time",
        NO_OFFSET,
    ),
    (
        "window-end-bad",
        {"data_session_update_end_time": "13:40"},
        "data.data_session_update_end_time",
        RFC3339,
    ),
    ("time-bad", {"time": "2022-12-14 noon"}, "time", RFC3339),
    ("time-number", {"time": 1.5}, "time", DATETIME),
]
FIELD_ERRORS += [
    (f"missing-{name}", {"drop": (name,)}, f"data.{name}", REQUIRED)
    for name in ("event_sid", "event_type", "timestamp", "account_sid", "sim_sid", "sim_iccid")
]


@pytest.mark.parametrize(
    ("raw", "reason", "field"),
    [pytest.param(raw, reason, field, id=name) for name, raw, reason, field in BAD_RECORDS],
)
def test_bad_input_is_a_decode_error_naming_the_field(
    raw: bytes, reason: str, field: str | None
) -> None:
    """Each kind of bad record raises DecodeError with a reason and field saying what is wrong."""
    error = failure(raw)
    assert reason in error.reason
    assert error.field == field
    assert str(error) == error.reason


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [pytest.param(o, field, message, id=name) for name, o, field, message in FIELD_ERRORS],
)
def test_invalid_field_is_a_decode_error_naming_it(
    overrides: dict[str, Any], field: str, message: str
) -> None:
    """A missing or ill-typed field fails with 'invalid <kind> event: <field>: <problem>'."""
    error = failure(mutated(**overrides))
    assert error.reason.startswith("invalid data-session.updated event: ")
    assert f"{field}: {message}" in error.reason
    assert error.field == field


def test_record_of_exactly_the_limit_is_not_rejected_for_size() -> None:
    """A record of exactly 1 MiB is within the Kinesis limit (and decodes if valid)."""
    base = len(make_record(padding=""))
    raw = make_record(padding="x" * (MAX_RECORD_BYTES - base))
    assert len(raw) == MAX_RECORD_BYTES
    assert connection(raw).extra == {
        "envelope": {},
        "data": {"padding": "x" * (MAX_RECORD_BYTES - base)},
    }


def test_validation_reason_names_the_kind() -> None:
    """A model validation failure says which kind of event was invalid."""
    error = failure(make_record("attachment.rejected", vendor="kore", error__code="x"))
    assert error.reason.startswith("invalid attachment.rejected event: data.error.code:")


def test_many_errors_are_summarised() -> None:
    """With many wrong fields, the reason lists the first three and counts the rest."""
    raw = mutated(sim_sid=1, account_sid=2, sim_iccid=3, imsi=4, imei=5)
    error = failure(raw)
    assert error.reason.count("Input should be a valid string") == 3
    assert error.reason.endswith("and 2 more")
    assert error.field == "data.account_sid"


@pytest.mark.parametrize(
    "overrides",
    [
        {"sim_iccid": int(SIM["sim_iccid"][:18])},
        {"imsi": int(SIM["imsi"])},
        {"imei": int(SIM["imei"])},
        {"imsi": {"value": SIM["imsi"]}},
        {"sim_iccid": [SIM["sim_iccid"]]},
        {"timestamp": SIM["imsi"]},
        {"data_download": SIM["imsi"]},
        {"location__cell_id": 47322374, "imsi": 1},
    ],
    ids=lambda o: "+".join(o),
)
def test_reasons_never_echo_field_values(overrides: dict[str, Any]) -> None:
    """A reason names the field and the problem, never the (possibly personal) value."""
    error = failure(mutated(**overrides))
    for value in (SIM["imsi"], SIM["sim_iccid"], SIM["sim_iccid"][:18], SIM["imei"], "47322374"):
        assert value not in error.reason


def test_long_type_is_cut_short_in_the_reason() -> None:
    """An absurdly long unknown type is truncated in the reason."""
    etype = "com.twilio.iot.supersim.connection." + "x" * 10_000
    error = failure(mutated(type=etype))
    assert len(error.reason) < 200


def test_decode_does_not_mutate_the_input() -> None:
    """Decoding the same bytes twice gives equal events (no shared state between calls)."""
    raw = make_record(data_as_string=True)
    assert connection(raw) == connection(raw)


# --- property tests: nothing but DecodeError escapes --------------------------------------------

TRICKY_STRINGS = st.sampled_from(
    [
        "2022-12-14T13:40:52Z",
        "2022-12-14T13:40:52.1234567+02:00",
        "9999-12-31T23:59:59-23:59",
        "0001-01-01T00:00:00+01:00",
        "2022-12-14T13:40:52",
        "1670000000",
        "https://events-schemas.twilio.com/SuperSim.ConnectionEvent/\u00b2",
        "https://events-schemas.twilio.com/SuperSim.ConnectionEvent/" + "7" * 5000,
        TWILIO_PREFIX + "data-session.updated",
        "com.kore.supersim.connection.attachment.rejected",
        '{"event_sid": "EZ0"}',
    ]
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | TRICKY_STRINGS
)
FIELD_NAMES = sorted({*ConnectionData.model_fields, *VALID, "cell_id", "lat", "lon", "code"})
KEYS = st.sampled_from(FIELD_NAMES) | st.text(max_size=10)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=20,
)
SMALL_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=3),
    max_leaves=4,
)
TYPES = st.sampled_from(
    [
        f"{p}{k}"
        for p in ("com.twilio.iot.supersim.connection.", "com.kore.supersim.connection.")
        for k in KINDS
    ]
    + [
        "com.twilio.eventstreams.test-event",
        "com.kore.eventstreams.test.event",
        "x.supersim.connection.y",
    ]
) | st.text(max_size=40)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_fails_cleanly(raw: bytes) -> DecodeError | None:
    """Decode ``raw``: it must return an event or raise DecodeError (returned), and a
    connection event must keep the model's promises (UTC times, byte counts >= 0)."""
    try:
        event = decode(raw)
    except DecodeError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert isinstance(error.reason, str)
        assert error.reason
        return error
    if isinstance(event, ConnectionEvent):
        data = event.data
        for name in TIME_FIELDS:
            value = getattr(data, name)
            assert value is None or is_utc(value)
        for name in ("data_download", "data_upload", "data_total", *CUMULATIVE_FIELDS):
            value = getattr(data, name)
            assert value is None or (type(value) is int and value >= 0)
        assert event.data.event_type.endswith(event.kind.value)
    return None


@PROPERTY
@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_decode_error(raw: bytes) -> None:
    """Any byte string decodes or raises DecodeError, never another exception."""
    decodes_or_fails_cleanly(raw)


@PROPERTY
@given(JSON_VALUES)
def test_arbitrary_json_only_raises_decode_error(value: Any) -> None:
    """Any JSON value decodes or raises DecodeError."""
    decodes_or_fails_cleanly(orjson.dumps(value))


@PROPERTY
@given(
    TYPES,
    st.dictionaries(KEYS, SMALL_VALUES, max_size=8),
    st.dictionaries(st.sampled_from(FIELD_NAMES), SMALL_VALUES, max_size=12),
    st.booleans(),
)
def test_arbitrary_envelopes_only_raise_decode_error(
    etype: str, envelope: dict[str, Any], data: dict[str, Any], as_string: bool
) -> None:
    """Envelopes of any type around data with known field names of any value never crash."""
    event = {**envelope, "type": etype, "data": orjson.dumps(data).decode() if as_string else data}
    decodes_or_fails_cleanly(orjson.dumps(event))


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths(child, (*prefix, index))
    return out


@st.composite
def mutated_records(draw: st.DrawFn) -> bytes:
    """A valid event of any kind/vendor/version with a few fields deleted or replaced."""
    kind = draw(st.sampled_from(KINDS))
    vendor = draw(st.sampled_from(VENDORS))
    event = make_event(kind, vendor, draw(st.sampled_from([1, 2])))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(event)
        path = draw(st.sampled_from(paths))
        parent: Any = event
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["delete", "replace", "stringify"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "stringify" and isinstance(parent[path[-1]], (dict, int, float)):
            parent[path[-1]] = orjson.dumps(parent[path[-1]]).decode()
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    if draw(st.booleans()) and isinstance(event.get("data"), dict):
        event["data"] = orjson.dumps(event["data"]).decode()
    raw = orjson.dumps(event)
    if draw(st.booleans()):
        position = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw = raw[:position] + draw(st.binary(min_size=0, max_size=3)) + raw[position + 1 :]
    return raw


@PROPERTY
@given(mutated_records())
def test_mutated_valid_records_only_raise_decode_error(raw: bytes) -> None:
    """Corrupted valid records decode or raise DecodeError, never echoing IMSI/ICCID/IMEI."""
    error = decodes_or_fails_cleanly(raw)
    if error is not None:
        for value in PII:
            assert value not in error.reason


def test_valid_event_is_not_changed_by_the_factory_copy() -> None:
    """make_event returns fresh objects: mutating one does not affect the next."""
    first = make_event()
    first["data"]["network"]["mcc"] = "999"
    assert make_event()["data"]["network"]["mcc"] == "310"
    assert copy.deepcopy(VALID) == make_event()


# --- the fast path agrees with the careful one -------------------------------------------------


def reference_time(text: str) -> datetime | None:
    """What the careful path makes of a time string: ``fromisoformat`` (also in upper case),
    aware, converted to UTC, from 1970 on; None where it refuses the string."""
    for candidate in (text, text.upper()):
        try:
            parsed = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if parsed.tzinfo is None:
            return None
        try:
            utc = parsed.astimezone(UTC)
        except OverflowError:
            return None
        return utc if utc.year >= 1970 else None
    return None


@st.composite
def time_texts(draw: st.DrawFn) -> str:
    """RFC 3339-like strings: real instants in many spellings, and near misses."""
    when = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    text = when.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt ")) + when.strftime("%H:%M:%S")
    digits = draw(st.integers(min_value=0, max_value=11))
    if digits:
        text += "." + f"{when.microsecond:06d}{draw(st.integers(0, 99999)):05d}"[:digits]
    text += draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+02:00", "-05:30", "", "+0000"]))
    if draw(st.booleans()):
        position = draw(st.integers(min_value=0, max_value=len(text) - 1))
        text = text[:position] + draw(st.sampled_from("0123456789-:TZ+. x6")) + text[position + 1 :]
    return text


@PROPERTY
@given(time_texts())
def test_time_parsing_matches_the_careful_path(text: str) -> None:
    """A time is refused exactly when the careful path refuses it, else read as the same
    UTC instant, whether the models parse it directly or it is normalised first."""
    expected = reference_time(text)
    for field in ("time", "timestamp"):
        raw = make_record(**{field: text})
        if expected is None:
            assert field in failure(raw).reason
            continue
        event = connection(raw)
        value = event.envelope.time if field == "time" else event.data.timestamp
        assert value == expected
        assert_utc(value)


def test_fast_constructor_builds_the_same_event() -> None:
    """decode's slot-setting constructor makes an event equal to the dataclass's own."""
    from worker.events.decode import _new_connection_event

    event = connection(make_record(), META)
    args = (event.kind, event.vendor, event.schema_version, event.envelope, event.meta, {"a": 1})
    built = _new_connection_event(*args)
    assert built == ConnectionEvent(*args)
    assert repr(built) == repr(ConnectionEvent(*args))
    with pytest.raises(AttributeError):
        built.kind = EventKind.ATTACHMENT_FAILED  # type: ignore[misc]


def test_fast_meta_constructor_builds_the_same_meta() -> None:
    """The pipeline's slot-setting ``KinesisMeta`` constructor makes a meta equal to the
    dataclass's own, as frozen."""
    from worker.events.records import new_kinesis_meta

    arrival = datetime(2026, 12, 6, 13, 0, tzinfo=UTC)
    for args in [("s", "1", "pk", arrival), ("s", "2", "", None)]:
        built = new_kinesis_meta(*args)
        assert built == KinesisMeta(*args)
        assert repr(built) == repr(KinesisMeta(*args))
        assert hash(built) == hash(KinesisMeta(*args))
    with pytest.raises(AttributeError):
        built.shard_id = "other"  # type: ignore[misc]


def test_unknown_field_replacing_a_missing_one_is_still_kept() -> None:
    """Unknown fields are noticed by count: one added where an optional one is absent."""
    event = make_event()
    del event["datacontenttype"]
    event["subject"] = "x"
    del event["data"]["apn"]
    event["data"]["apn_name"] = "super"
    decoded = connection(to_record(event))
    assert decoded.extra == {"envelope": {"subject": "x"}, "data": {"apn_name": "super"}}
