"""The built-in ``metering`` handler: billing-exact data usage in Redis.

Bytes down and up (total = down + up) per SIM, fleet, account and visited network
(``<iso_country>-<mcc>-<mnc>``, ``unknown`` when the event names none), in UTC hourly and
daily buckets, plus one record per data session that mirrors the DataSession resource.

**Attribution.** A window's bytes go to the UTC hour (and day) of its
``data_session_update_end_time``. With an ``updated+ended`` subscription every window lands
in its own hour. ``data-session.ended`` carries the session's cumulative totals (schema
v2): the ended window is credited with *cumulative minus the updated windows counted so
far*, in the hour of the ended window's end. So with an ``ended-only`` subscription the
whole session lands in the hour its session ended, and when updated events arrive later
(out of order) their bytes move from the ended hour to their own hour. Daily totals per
SIM are the same for both subscriptions as long as a session does not cross a UTC
midnight; a real session that does is metered per window with updated events, but under
``ended-only`` all of it goes to the day it ended. Schema v1 has no cumulative totals:
each window (ended included) is credited with its own bytes, so v1 ``ended-only`` meters
only the ended windows.

**Exactness.** Each batch is one ``EVALSHA`` of ``metering.lua`` (atomic, one round trip).
Per session it keeps the updated windows already counted (as merged intervals of window
start/end, so an in-order session is a single interval) with their byte sums, and the
ended event's hour, window bytes and cumulative totals. Every bucket then always holds
exactly: the bytes of each distinct updated window seen, in its hour, plus, per session
whose ended event was seen, its cumulative minus those windows' sum (v1: the ended
window's bytes), in the ended hour. That is a function of the *set* of distinct events
seen, not of their order, duplicates, replays, or of which replica handled them (scripts
run one at a time), so any permutation ends in the same buckets, hour by hour. Copies of
one window that name different fleets, accounts or networks count once, under the first
copy seen: an updated window under the copy that counted it, the ended share under the
ended copy seen first (it fixes the session's operator group; later events never change
it), so a share is always moved under the fleet, account and network it was credited to.

**Redis keys** (``P`` is the stream's prefix, e.g. ``{sw:stream:group}``, so one script
touches one Cluster slot; ``D`` is ``s`` SIM, ``f`` fleet, ``a`` account, ``n`` network):

=================================  ====  ======================================================
key                                type  holds
=================================  ====  ======================================================
``P:m:h:D:<id>:<YYYYMMDD>``        hash  fields ``HHd``/``HHu``: bytes down/up in UTC hour HH
``P:m:d:D:<id>:<YYYYMM>``          hash  fields ``DDd``/``DDu``: bytes down/up on UTC day DD
``P:m:s:<sim_sid>:<YYYYMMDD>``     hash  sessions that started that UTC day: session sid ->
                                         packed record (``RECORD_FIELDS``), and ``~`` ->
                                         the values records share (``DEFAULTED_FIELDS``)
=================================  ====  ======================================================

**Retention.** A bucket hash expires ``hour_retention_days``/``day_retention_days`` after
it last gained a field (a new hour or day), a session hash ``session_retention_days``
after one of its records last changed. Duplicates are recognised while the session's
record lives: keep it longer than the stream's retention plus the longest replay. Daily
buckets must outlive session records (enforced); hourly ones should too, or a window
arriving after its session's ended hour expired leaves a negative figure in a re-created
hour. Decode refuses data-session events without ``data_session_start_time``: a session's
windows are filed under its start.

**Exactness.** Byte sums in the script are doubles, exact below 2**53 (decode caps each count
at 2**53 - 1). A batch or session sum reaching it, or a bucket total HINCRBY refuses (beyond
2**63 - 1), fails the whole call with nothing written; the consumer then isolates the
event(s) responsible and dead-letters them. Real traffic is petabytes below either limit.

**Cost** (``tests/bench/metering_bench.py``): one round trip per batch; about 11 µs of
worker CPU and 40 µs of Redis CPU per event (so a 1,000-event batch holds Redis for tens
of milliseconds). Memory: about 1 KB per SIM for an hour of activity; at the default
retention about 106 KiB per SIM with 12 data sessions per SIM and day, 80 KiB of it
session records (a record is ~100 bytes; raising Redis' ``hash-max-listpack-value`` to
256 stores them a fifth smaller). Memory grows with the number of data sessions and is
bounded by the retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog

from worker.events.records import ConnectionEvent, EventKind
from worker.handlers.base import Batch, HandlerContext, Plugin, StreamFacts
from worker.handlers.metering.settings import MeteringSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

DAY: Final = 86_400

DIMENSIONS: Final = {"sim": "s", "fleet": "f", "account": "a", "network": "n"}
"""Dimension name -> its letter in bucket keys."""

RECORD_FIELDS: Final = (
    "start",  # session start, Unix seconds; the other times are seconds after it
    "end",  # session end (from the ended event), relative
    "opri",  # priority of the event the operator group comes from
    "og",  # operator group: OPERATOR_GROUP joined by "^"; fixed by the first ended event
    "lpri",  # priority of the event the location comes from
    "loc",  # location group: LOCATION_GROUP joined by "^", "" if never reported
    "ipri",  # priority of the event the IMEI comes from
    "imei",
    "cov",  # updated windows counted: "a:b,c:d", relative
    "sd",  # bytes down of the updated windows counted
    "su",  # bytes up of the updated windows counted
    "eh",  # UTC hour "YYYYMMDDHH" of the ended window's end, "" until the ended event
    "ewd",  # the ended window's own bytes down
    "ewu",  # ... and up
    "cd",  # the session's cumulative bytes down from the ended event, "" if v1
    "cu",  # ... and up
)
"""Positions in a packed session record (``|``-separated). A priority is twice the
source event's window end (relative), plus one for the ended event."""

OPERATOR_GROUP: Final = ("fleet", "account", "network", "rat", "mcc", "mnc", "operator", "country")
LOCATION_GROUP: Final = ("cell", "lat", "lon")

DEFAULTED_FIELDS: Final = ("og", "loc", "imei")
"""Record fields that usually repeat across a SIM's sessions. Each SIM-day hash keeps
their values from its first record in ``DEFAULTS_FIELD`` (``|``-separated); a record
stores ``SAME`` for a value equal to its hash's default, and for an ``lpri``/``ipri``
equal to its ``opri``."""
DEFAULTS_FIELD: Final = "~"
SAME: Final = "="

EVENT_FIELDS: Final = (
    "kind",
    "sim",
    "session",
    "start_day",
    "start",
    "win_start",
    "win_end",
    "hour",
    "down",
    "up",
    "cum_down",
    "cum_up",
    "end",
    "fleet",
    "account",
    "network",
    "operator_group",
    "location_group",
    "imei",
)
"""Per-event arguments of the script, in order (see ``metering.lua``)."""

_KIND_CODES: Final = {
    EventKind.DATA_SESSION_STARTED: "s",
    EventKind.DATA_SESSION_UPDATED: "u",
    EventKind.DATA_SESSION_ENDED: "e",
}
_HOUR_CACHE_MAX: Final = 50_000


def hourly_key(prefix: str, dimension: str, ident: str, day: str) -> str:
    """Hash of one UTC day (``YYYYMMDD``) of hourly buckets."""
    return f"{prefix}:m:h:{DIMENSIONS[dimension]}:{ident}:{day}"


def daily_key(prefix: str, dimension: str, ident: str, month: str) -> str:
    """Hash of one UTC month (``YYYYMM``) of daily buckets."""
    return f"{prefix}:m:d:{DIMENSIONS[dimension]}:{ident}:{month}"


def sessions_key(prefix: str, sim_sid: str, day: str) -> str:
    """Hash of the sessions of one SIM that started on one UTC day (``YYYYMMDD``)."""
    return f"{prefix}:m:s:{sim_sid}:{day}"


def unpack_record(packed: str, defaults: str = "") -> dict[str, str]:
    """A stored session record as a field -> value mapping: ``RECORD_FIELDS`` plus the
    fields of its operator and location groups. ``defaults`` is its hash's
    ``DEFAULTS_FIELD`` value."""
    record = dict(zip(RECORD_FIELDS, packed.split("|"), strict=False))
    default = dict(zip(DEFAULTED_FIELDS, defaults.split("|"), strict=False))
    for name in DEFAULTED_FIELDS:
        if record.get(name) == SAME:
            record[name] = default.get(name, "")
    for name in ("lpri", "ipri"):
        if record.get(name) == SAME:
            record[name] = record.get("opri", "")
    record.update(zip(OPERATOR_GROUP, record.get("og", "").split("^"), strict=False))
    record.update(zip(LOCATION_GROUP, record.get("loc", "").split("^"), strict=False))
    return record


def network_key(iso_country: str | None, mcc: str | None, mnc: str | None) -> str:
    """``<iso_country>-<mcc>-<mnc>`` of a visited network, ``unknown`` if none is named."""
    if not (iso_country or mcc or mnc):
        return "unknown"
    return f"{iso_country or ''}-{mcc or ''}-{mnc or ''}"


def session_bytes(record: dict[str, str]) -> tuple[int, int]:
    """(down, up) of a session record: its updated windows plus the ended window's share
    (cumulative minus those windows with schema v2, else the ended window's bytes)."""
    down, up = int(record.get("sd") or 0), int(record.get("su") or 0)
    if not record.get("eh"):
        return down, up
    if record.get("cd"):
        return max(int(record["cd"]), down), max(int(record["cu"]), up)
    return down + int(record.get("ewd") or 0), up + int(record.get("ewu") or 0)


def load_script() -> str:
    """The Lua source with the record layout filled in from ``RECORD_FIELDS``."""
    source = resources.files("worker.handlers.metering").joinpath("metering.lua").read_text("utf-8")
    for marker, names in (
        ("--[[RECORD_FIELDS]]", RECORD_FIELDS),
        ("--[[DEFAULTED_FIELDS]]", DEFAULTED_FIELDS),
    ):
        source = source.replace(marker, ", ".join(f"'{name}'" for name in names))
    return source


def _text(value: str | None) -> str:
    """A text field as stored in a session record: no ``|`` or ``^`` (separators)."""
    if value is None:
        return ""
    if "|" in value or "^" in value:
        return value.replace("|", "/").replace("^", "/")
    return value


class _Hours:
    """UTC hour strings (``YYYYMMDDHH``) by Unix hour, computed once each."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def __call__(self, seconds: int) -> str:
        hour = seconds // 3600
        text = self._cache.get(hour)
        if text is None:
            if len(self._cache) >= _HOUR_CACHE_MAX:
                self._cache.clear()
            text = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y%m%d%H")
            self._cache[hour] = text
        return text


EncodedEvent = tuple[str | int, ...]


def encode(events: Sequence[ConnectionEvent], hours: _Hours | None = None) -> list[EncodedEvent]:
    """The script's arguments (``EVENT_FIELDS``) for each event that matters to metering:
    started, updated and ended data-session events. Times are Unix seconds; text that is
    stored in session records loses any ``|``."""
    hour_of = hours or _Hours()
    out: list[EncodedEvent] = []
    for event in events:
        code = _KIND_CODES.get(event.kind)
        if code is None:
            continue
        data = event.data
        session = data.data_session_sid
        if session is None:  # decode refuses these
            raise ValueError(f"{event.kind.value} event lacks data.data_session_sid")
        if session == DEFAULTS_FIELD:
            raise ValueError(
                f"data.data_session_sid {DEFAULTS_FIELD!r} is not a session id (it names a "
                "field of the session records)"
            )
        start_time = data.data_session_start_time
        if start_time is None:  # decode refuses these: a session is filed under its start
            raise ValueError(f"{event.kind.value} event lacks data.data_session_start_time")
        start = int(start_time.timestamp())
        start_day = hour_of(start)[:8]
        win_start = win_end = end = down = up = 0
        hour = ""
        cum_down: str | int = ""
        cum_up: str | int = ""
        if code != "s":
            window_start = data.data_session_update_start_time
            window_end = data.data_session_update_end_time
            if window_start is None or window_end is None:  # decode refuses these too
                raise ValueError(f"{event.kind.value} event lacks its update window")
            win_start, win_end = int(window_start.timestamp()), int(window_end.timestamp())
            hour = hour_of(win_end)
            down, up = data.data_download or 0, data.data_upload or 0
            cd, cu = data.data_session_data_download, data.data_session_data_upload
            if cd is not None and cu is not None:
                cum_down, cum_up = cd, cu
            end_time = data.data_session_end_time
            end = int(end_time.timestamp()) if end_time is not None else win_end
        fleet, account = _text(data.fleet_sid), _text(data.account_sid)
        network = data.network
        if network is None:
            net, mcc, mnc, name, country = "unknown", "", "", "", ""
        else:
            net = _text(network_key(network.iso_country, network.mcc, network.mnc))
            mcc, mnc = _text(network.mcc), _text(network.mnc)
            name, country = _text(network.friendly_name), _text(network.iso_country)
        group = (fleet, account, net, _text(data.rat_type), mcc, mnc, name, country)
        location = data.location
        if location is None or (location.cell_id is None and location.lat is None):
            where = ""
        else:
            lat = "" if location.lat is None else repr(location.lat)
            lon = "" if location.lon is None else repr(location.lon)
            where = f"{_text(location.cell_id)}^{lat}^{lon}"
        imei = _text(data.imei)
        out.append(
            (
                code,
                data.sim_sid,
                session,
                start_day,
                start,
                win_start,
                win_end,
                hour,
                down,
                up,
                cum_down,
                cum_up,
                end,
                fleet,
                account,
                net,
                "^".join(group),
                where,
                imei if imei != SAME else "",
            )
        )
    return out


class MeteringHandler:
    """Meters data usage in Redis with one atomic, idempotent script call per batch."""

    name = "metering"

    def __init__(self, redis: Redis, key_prefix: str, settings: MeteringSettings) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self.settings = settings
        self._script = redis.register_script(load_script())
        self._route_key = f"{key_prefix}:m"
        self._head = [
            key_prefix,
            str(settings.hour_retention_days * DAY),
            str(settings.day_retention_days * DAY),
            str(settings.session_retention_days * DAY),
        ]
        self._hours = _Hours()
        self._log = structlog.get_logger("worker.handlers.metering.handler")
        self.windows_counted = 0
        self.unchanged = 0

    async def handle(self, batch: Batch) -> None:
        encoded = encode(batch.events, self._hours)
        if not encoded:
            return
        result: Any = await self._script(
            keys=[self._route_key], args=[*self._head, orjson.dumps(encoded)]
        )
        counted, unchanged = int(result[0]), int(result[1])
        self.windows_counted += counted
        self.unchanged += unchanged
        self._log.debug(
            "metered",
            shard_id=batch.shard_id,
            events=len(encoded),
            counted=counted,
            unchanged=unchanged,
        )

    async def start(self, stream: StreamFacts) -> None:
        """Warn when the stream keeps records longer than metering keeps its session
        records: a replay or backfill reaching further back would count those windows
        again."""
        hours, days = stream.retention_hours, self.settings.session_retention_days
        if hours is not None and hours > days * 24:
            self._log.warning(
                "metering_session_retention_shorter_than_stream",
                stream_retention_hours=hours,
                session_retention_days=days,
                fix="raise SUPERSIM_METERING__SESSION_RETENTION_DAYS above the stream's "
                "retention, or never replay further back than it",
            )

    async def close(self) -> None:
        """Nothing to release: the Redis connection belongs to the worker."""
        self._log.info(
            "metering_totals", windows_counted=self.windows_counted, unchanged=self.unchanged
        )


def create(context: HandlerContext[MeteringSettings]) -> MeteringHandler:
    return MeteringHandler(context.redis, context.key_prefix, context.settings)


plugin: Final = Plugin(create, settings=MeteringSettings, section="metering")
"""The ``metering`` handler, with its settings from ``SUPERSIM_METERING__*``."""
