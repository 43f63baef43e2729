"""Typed records for Super SIM Connection Events and the Kinesis record they came in.

One Kinesis record holds one CloudEvent in structured JSON. Its ``data`` object has the
same shape for every connection event kind and for both vendors (Twilio, KORE); only
the envelope differs. These models describe that shape; ``worker.events.decode`` builds them.

All datetimes are timezone-aware and normalised to UTC. Byte counts are integers from 0
to 2**53 - 1 (9 PB: every count stays exact where it is summed as a double, in Redis's Lua).
Unknown fields are kept, never fatal: the envelope's and ``data``'s in
``ConnectionEvent.extra``, those of ``network``, ``location`` and ``error`` in the nested
models' ``model_extra``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictFloat,
    StrictInt,
    StrictStr,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

MAX_RECORD_BYTES: Final = 1024 * 1024
"""Kinesis' own limit for one record's data blob; anything larger is not a real record."""


EARLIEST_YEAR: Final = 1970
"""Event times before this year are refused (``RFC3339_UTC`` below)."""
RFC3339_UTC: Final = (
    r"^(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?(Z|\+00:00)$"
)
"""The RFC 3339 form events use (upper-case ``T``, offset ``Z`` or ``+00:00``, a year from
1970: no event predates Unix time, and metering keys hours by four-digit years), which the
models parse themselves. ``worker.events.decode`` rewrites any other valid RFC 3339 time (another
offset, lower case) into this form first, and rejects what is not RFC 3339 with a reason."""


class _UtcDatetimeSchema:
    """Validation of ``UtcDatetime``, done by pydantic-core without a Python call.

    A string must match ``RFC3339_UTC`` before it is parsed, so a string of digits is never
    read as a Unix time, and must be in UTC. A datetime instance (records built in code)
    must be aware and is converted to UTC. Numbers and other types are refused.
    """

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        from_string = core_schema.chain_schema(
            [
                core_schema.str_schema(strict=True, pattern=RFC3339_UTC),
                core_schema.datetime_schema(tz_constraint=0),
            ]
        )
        from_datetime = core_schema.no_info_after_validator_function(
            _to_utc, core_schema.datetime_schema(strict=True, tz_constraint="aware")
        )
        return core_schema.custom_error_schema(
            core_schema.union_schema([from_string, from_datetime], mode="left_to_right"),
            custom_error_type="utc_datetime",
            custom_error_message="Input should be an RFC 3339 date-time string",
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "date-time"}


def _to_utc(value: datetime) -> datetime:
    return value if value.tzinfo is UTC else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, _UtcDatetimeSchema()]
"""An aware datetime in UTC. The models parse RFC 3339 strings in UTC themselves (in Rust,
far cheaper than a Python validator per field); ``worker.events.decode`` normalises other offsets
first. Parsed times carry pydantic's UTC ``tzinfo``, which compares, hashes and formats
like ``datetime.UTC``."""
MAX_BYTES: Final = 2**53 - 1
"""The largest byte count accepted: integers up to it are exact as doubles (Lua numbers)."""
ByteCount = Annotated[StrictInt, Field(ge=0, le=MAX_BYTES)]


class EventKind(StrEnum):
    """The seven connection event kinds, named by the suffix after ``supersim.connection.``."""

    ATTACHMENT_ACCEPTED = "attachment.accepted"
    ATTACHMENT_REJECTED = "attachment.rejected"
    ATTACHMENT_FAILED = "attachment.failed"
    DATA_SESSION_STARTED = "data-session.started"
    DATA_SESSION_UPDATED = "data-session.updated"
    DATA_SESSION_ENDED = "data-session.ended"
    DATA_SESSION_FAILED = "data-session.failed"

    @property
    def is_data_session(self) -> bool:
        return self.value.startswith("data-session.")

    @property
    def carries_usage(self) -> bool:
        """True for the kinds whose ``data`` reports bytes used in a window."""
        return self in (EventKind.DATA_SESSION_UPDATED, EventKind.DATA_SESSION_ENDED)


class Vendor(StrEnum):
    TWILIO = "twilio"
    KORE = "kore"
    OTHER = "other"


class _Open(BaseModel):
    """Base for small nested payload objects: unknown fields are kept, instances are immutable."""

    model_config = ConfigDict(extra="allow", frozen=True)


class _Closed(BaseModel):
    """Base for the envelope and ``data``: unknown fields are kept by ``worker.events.decode`` in
    ``ConnectionEvent.extra`` rather than by pydantic (``extra="allow"`` doubles the cost)."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class Network(_Open):
    """The visited network the SIM attached or tried to attach to."""

    mcc: StrictStr | None = None
    mnc: StrictStr | None = None
    sid: StrictStr | None = None
    friendly_name: StrictStr | None = None
    iso_country: StrictStr | None = None


class Location(_Open):
    """The cell the device was connected to, when the visited network reports it."""

    cell_id: StrictStr | None = None
    lac: StrictStr | None = None
    lat: StrictFloat | None = None
    lon: StrictFloat | None = None


class EventError(_Open):
    """What went wrong, on rejected and failed events."""

    code: StrictInt
    message: StrictStr | None = None


class ConnectionDataV1(_Closed):
    """The ``data`` object of schema version 1 (no cumulative session totals)."""

    event_sid: StrictStr
    event_type: StrictStr
    timestamp: UtcDatetime
    account_sid: StrictStr
    sim_sid: StrictStr
    sim_iccid: StrictStr
    sim_unique_name: StrictStr | None = None
    fleet_sid: StrictStr | None = None
    imsi: StrictStr | None = None
    imei: StrictStr | None = None
    apn: StrictStr | None = None
    ip_address: StrictStr | None = None
    rat_type: StrictStr | None = None
    network: Network | None = None
    location: Location | None = None
    error: EventError | None = None
    data_modifier: StrictStr | None = None
    data_session_sid: StrictStr | None = None
    data_session_start_time: UtcDatetime | None = None
    data_session_end_time: UtcDatetime | None = None
    data_session_update_start_time: UtcDatetime | None = None
    data_session_update_end_time: UtcDatetime | None = None
    data_download: ByteCount | None = None
    data_upload: ByteCount | None = None
    data_total: ByteCount | None = None


class ConnectionDataV2(ConnectionDataV1):
    """The ``data`` object of schema version 2: adds the session's cumulative totals."""

    data_session_data_download: ByteCount | None = None
    data_session_data_upload: ByteCount | None = None
    data_session_data_total: ByteCount | None = None


ConnectionData = ConnectionDataV2
"""The model events are decoded with: v2 is a superset of v1."""


class Envelope(_Closed):
    """The CloudEvent envelope of a connection event (structured JSON mode)."""

    specversion: StrictStr
    type: StrictStr
    source: StrictStr
    id: StrictStr
    dataschema: StrictStr | None = None
    datacontenttype: StrictStr | None = None
    time: UtcDatetime | None = None


class ConnectionEnvelope(Envelope):
    """A connection event as published: the envelope with its typed ``data``."""

    data: ConnectionData


class SinkTestEnvelope(Envelope):
    """A sink test event (``com.twilio.eventstreams.test-event`` and KORE's equivalent)."""

    data: Any = None


@dataclass(frozen=True, slots=True)
class KinesisMeta:
    """Where a record came from: needed for checkpoints, lag and de-duplication."""

    shard_id: str
    sequence_number: str
    partition_key: str
    arrival: datetime | None = None


def _kinesis_meta_builder() -> Callable[[str, str, str, datetime | None], KinesisMeta]:
    """A constructor for ``KinesisMeta`` that sets its slots directly, as ``decode`` builds
    ``ConnectionEvent``: a frozen dataclass's ``__init__`` goes through
    ``object.__setattr__`` for every field, the slots' own descriptors take half the time.
    A test checks both build equal instances."""
    setters = [KinesisMeta.__dict__[field.name].__set__ for field in fields(KinesisMeta)]
    if len(setters) != 4:  # pragma: no cover - guards an edit of KinesisMeta
        raise RuntimeError("KinesisMeta's fields changed: update _kinesis_meta_builder")
    set_shard, set_sequence, set_key, set_arrival = setters
    new = object.__new__

    def build(
        shard_id: str, sequence_number: str, partition_key: str, arrival: datetime | None
    ) -> KinesisMeta:
        meta: KinesisMeta = new(KinesisMeta)
        set_shard(meta, shard_id)
        set_sequence(meta, sequence_number)
        set_key(meta, partition_key)
        set_arrival(meta, arrival)
        return meta

    return build


new_kinesis_meta: Final = _kinesis_meta_builder()
"""``KinesisMeta(shard_id, sequence_number, partition_key, arrival)``, built faster (once
per record)."""


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A decoded Super SIM connection event."""

    kind: EventKind
    vendor: Vendor
    schema_version: int
    envelope: ConnectionEnvelope
    meta: KinesisMeta | None = None
    extra: Mapping[str, Any] | None = None
    """Unknown fields by place, ``{"envelope": {...}, "data": {...}}``; None if there are none.
    Unknown fields of ``network``, ``location`` and ``error`` are in their ``model_extra``."""
    category: ClassVar[Literal["connection"]] = "connection"

    @property
    def data(self) -> ConnectionData:
        return self.envelope.data

    @property
    def event_sid(self) -> str:
        return self.envelope.data.event_sid


@dataclass(frozen=True, slots=True)
class SinkTestEvent:
    """A sink test event: valid input that handlers skip."""

    vendor: Vendor
    envelope: SinkTestEnvelope
    meta: KinesisMeta | None = None
    category: ClassVar[Literal["sink_test"]] = "sink_test"


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """A well-formed CloudEvent of another type: counted and skipped."""

    type: str
    id: str
    meta: KinesisMeta | None = None
    category: ClassVar[Literal["other"]] = "other"


DecodedEvent = ConnectionEvent | SinkTestEvent | OtherEvent
