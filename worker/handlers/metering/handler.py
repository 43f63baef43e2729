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
``P:m:h:D:<id>:<YYYYMMDD>``        hash  field ``H``/``1HH`` (``H`` + 100): bytes down/up in
                                         UTC hour H (0-23)
``P:m:d:D:<id>:<YYYYMM>``          hash  field ``D``/``1DD`` (``D`` + 100): bytes down/up on
                                         UTC day D (1-31)
``P:m:r:<sim_sid>:<YYYYMMDD>``     hash  sessions that started that UTC day: session sid ->
                                         packed record, plus shared values
                                         (:mod:`~worker.handlers.metering.records`)
=================================  ====  ======================================================

Field names that are small numbers and values that are integers are what Redis stores most
compactly in a small hash (a listpack). Buckets written by the previous layout (fields
``HHd``/``HHu`` and ``DDd``/``DDu``) and its session hashes (``P:m:s:``) are still read and
added in; the script moves a previous-layout session record to its new hash when the
session changes.

**Retention.** A bucket hash expires ``hour_retention_days``/``day_retention_days`` after
it last gained a field (a new hour or day), a session hash ``session_retention_days``
after one of its records last changed. Duplicates are recognised while the session's
record lives: so it must outlive the stream's retention (a replay or backfill reads that
far back) plus ``SESSION_MARGIN_HOURS`` (duplicates written late, lag), which ``start``
checks; the default, 8 days, covers Kinesis' 7-day extended retention. Daily
buckets must outlive session records (enforced); hourly ones should too, or a window
arriving after its session's ended hour expired leaves a negative figure in a re-created
hour. Decode refuses data-session events without ``data_session_start_time``: a session's
windows are filed under its start.

**Exactness.** Byte sums in the script are doubles, exact below 2**53 (decode caps each count
at 2**53 - 1). A batch or session sum reaching it, or a bucket total HINCRBY refuses (beyond
2**63 - 1), fails the whole call with nothing written; the consumer then isolates the
event(s) responsible and dead-letters them. Real traffic is petabytes below either limit.

**Cost** (``tests/bench/metering_bench.py``, BENCHMARKS.md): one round trip per batch.
Memory grows with the number of data sessions and is bounded by the retention.
"""

from __future__ import annotations

import re
import struct
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from itertools import count
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar

import orjson
import structlog

from worker.errors import ConfigError
from worker.events.records import ConnectionEvent, EventKind, Location, Network
from worker.events.times import unix_seconds
from worker.handlers.base import Batch, HandlerContext, Plugin, StreamFacts
from worker.handlers.metering import records
from worker.handlers.metering.settings import MeteringSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

DAY: Final = 86_400
SESSION_MARGIN_HOURS: Final = 24
"""How much longer than the stream's retention session records must live (start-up check):
room for a duplicate written after its first copy, and for the consumer's lag."""

LAYOUT: Final = 2
"""The Redis layout this release writes, recorded at ``<prefix>:m:layout``: 1 the session
hashes ``P:m:s:``, 2 the packed SIM-day hashes ``P:m:r:`` (``records.py``). A release
refuses to start on data of a newer layout, which it would misread and count again; the
layout-1 releases did not check, so a rollback across layout 2 is not supported."""


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
    "session_field",
)
"""The fields of an event as ``encode`` gives them and the script reads them (see
``metering.lua``), then a last one, 1 if it carries cumulative totals (else both cumulative
fields are 0). ``kind`` is 0 started, 1 updated, 2 ended; each text is its number in the
batch's list of texts (from 1). ``session_field`` numbers the session's field
in the script's sids argument (from 1), 0 if its sid is not a standard one (then the sid is
the field)."""

_EVENT_FORMAT: Final = "<BIIIdddIdddddIIIIIIIB"
"""An encoded event as the script reads it (``struct.unpack`` in Lua): each text number an
unsigned int, each number a double (every time and byte count is an integer below 2**53,
exact as one). Decoding a JSON array of arrays cost the script a quarter of its work; this
costs a fraction."""
_EVENT: Final = struct.Struct(_EVENT_FORMAT)

EncodedEvent = tuple[int, ...]
"""An event for the script: its kind, ``EVENT_FIELDS`` and the totals flag, as numbers."""


class Encoded(NamedTuple):
    """What ``encode`` gives for a batch."""

    events: list[EncodedEvent]
    sids: bytes
    """The session fields of the standard sids: byte 255 and the sid's 16 bytes each."""
    texts: list[str]
    """The batch's texts, each once, in the order of the numbers the events give them."""


def pack_events(events: Sequence[EncodedEvent]) -> bytes:
    """``events`` as the script's events argument (``_EVENT_FORMAT`` each)."""
    pack = _EVENT.pack
    return b"".join([pack(*event) for event in events])


def texts_argument(texts: Sequence[str]) -> bytes:
    """The script's texts argument: a JSON array."""
    return orjson.dumps(texts)


_KIND_CODES: Final = {
    EventKind.DATA_SESSION_STARTED: 0,
    EventKind.DATA_SESSION_UPDATED: 1,
    EventKind.DATA_SESSION_ENDED: 2,
}
_HOUR_CACHE_MAX: Final = 50_000
K = TypeVar("K")
V = TypeVar("V")
_TEXT_CACHE_MAX: Final = 10_000
"""Distinct networks and places kept (each cache is emptied when full)."""
_CACHED_TEXT_LIMIT: Final = 256
"""Longer texts are made again each time rather than kept: the fields behind them are
bounded only by the record size, so a few odd events must not pin megabytes."""


def network_key(iso_country: str | None, mcc: str | None, mnc: str | None) -> str:
    """``<iso_country>-<mcc>-<mnc>`` of a visited network, ``unknown`` if none is named."""
    if not (iso_country or mcc or mnc):
        return "unknown"
    return f"{iso_country or ''}-{mcc or ''}-{mnc or ''}"


def load_script() -> str:
    """The Lua source with the record layouts filled in from ``records``."""
    return fill_layout(
        resources.files("worker.handlers.metering").joinpath("metering.lua").read_text("utf-8")
    )


def fill_layout(source: str) -> str:
    """``source`` (a ``metering.lua``) with its markers replaced by the layout in ``records``."""
    for marker, names in (
        ("--[[RECORD_FIELDS]]", records.RECORD_FIELDS),
        ("--[[COMPONENTS]]", records.COMPONENTS),
        ("--[[COMPONENT_CODES]]", records.COMPONENT_CODES),
        ("--[[LEGACY_FIELDS]]", records.LEGACY_FIELDS),
    ):
        source = source.replace(marker, ", ".join(f"'{name}'" for name in names))
    for marker, value in (
        ("--[[COUNT_FIELD]]", records.COUNT_FIELD),
        ("--[[NONE_SLOT]]", records.NONE_SLOT),
        ("--[[FIELD_LIMIT]]", str(records.FIELD_LIMIT)),
        ("--[[COVERAGE_CODE]]", records.COVERAGE_CODE),
        ("--[[COVERAGE_REF]]", records.COVERAGE_REF),
        ("--[[EVENT_FORMAT]]", _EVENT_FORMAT),
    ):
        source = source.replace(marker, value)
    return source


def _text(value: str | None) -> str:
    """A text field as stored in a session record: no ``|`` or ``^`` (separators)."""
    if value is None:
        return ""
    if "|" in value or "^" in value:
        return value.replace("|", "/").replace("^", "/")
    return value


class _Texts:
    """UTC hour strings (``YYYYMMDDHH``) by Unix hour, computed once each; and the text of
    each distinct network and place, which repeat from event to event of a SIM."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}
        self.groups: dict[tuple[str | None, ...], tuple[str, str]] = {}
        self.places: dict[tuple[str | None, float | None, float | None], str] = {}

    def hour(self, seconds: int) -> str:
        hour = seconds // 3600
        text = self._cache.get(hour)
        if text is None:
            text = datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y%m%d%H")
            _keep(self._cache, hour, text, _HOUR_CACHE_MAX)
        return text

    def group(self, network: Network | None, rat_type: str | None) -> tuple[str, str]:
        """The network key and the usage group (``^``-joined) of an event."""
        if network is None:
            key: tuple[str | None, ...] = (rat_type,)
        else:
            key = (
                network.iso_country,
                network.mcc,
                network.mnc,
                network.friendly_name,
                rat_type,
            )
        found = self.groups.get(key)
        if found is None:
            if network is None:
                net, mcc, mnc, name, country = "unknown", "", "", "", ""
            else:
                net = _text(network_key(network.iso_country, network.mcc, network.mnc))
                mcc, mnc = _text(network.mcc), _text(network.mnc)
                name, country = _text(network.friendly_name), _text(network.iso_country)
            found = (net, "^".join((net, _text(rat_type), mcc, mnc, name, country)))
            if len(found[1]) <= _CACHED_TEXT_LIMIT:
                _keep(self.groups, key, found, _TEXT_CACHE_MAX)
        return found

    def place(self, location: Location | None) -> str:
        """The cell and coordinates of an event (``^``-joined), or ``""``."""
        if location is None or (location.cell_id is None and location.lat is None):
            return ""
        lat, lon = location.lat, location.lon
        if lat == 0.0 or lon == 0.0:  # -0.0 equals 0.0 as a key but is written apart
            return _place(location.cell_id, lat, lon)
        key = (location.cell_id, lat, lon)
        found = self.places.get(key)
        if found is None:
            found = _place(location.cell_id, lat, lon)
            if len(found) <= _CACHED_TEXT_LIMIT:
                _keep(self.places, key, found, _TEXT_CACHE_MAX)
        return found


def _keep(cache: dict[K, V], key: K, value: V, most: int) -> None:
    """Store ``value`` in ``cache``, emptying it first when it holds ``most`` entries."""
    if len(cache) >= most:
        cache.clear()
    cache[key] = value


def _place(cell_id: str | None, lat: float | None, lon: float | None) -> str:
    return f"{_text(cell_id)}^{'' if lat is None else repr(lat)}^{'' if lon is None else repr(lon)}"


_STANDARD_SID: Final = re.compile(r"PI[0-9a-f]{32}")


def encode(
    events: Sequence[ConnectionEvent],
    texts: _Texts | None = None,
    kinds: Sequence[EventKind] | None = None,
) -> Encoded:
    """The script's arguments for each event that matters to metering (started, updated
    and ended data-session events; see ``EVENT_FIELDS``), with the batch's texts numbered in
    order of appearance, and the session fields of the standard sids. Times are Unix
    seconds; text that is stored in session records loses any ``|``. Identical events give
    identical tuples. ``kinds``: each event's kind, as ``Batch.kinds`` holds them (read from
    the events when None)."""
    texts = texts or _Texts()
    if kinds is None:
        kinds = [event.kind for event in events]
    hour_of = texts.hour
    numbers: defaultdict[str, int] = defaultdict(count(1).__next__)
    out: list[EncodedEvent] = []
    fields: dict[str, int] = {}
    for kind, event in zip(kinds, events, strict=True):
        code = _KIND_CODES.get(kind)
        if code is None:
            continue
        data = event.envelope.data
        session = data.data_session_sid
        if session is None:  # decode refuses these
            raise ValueError(f"{event.kind.value} event lacks data.data_session_sid")
        if session.startswith(records.RESERVED):
            raise ValueError(
                f"data.data_session_sid {session!r} is not a session id (session hashes use "
                f"fields starting with {records.RESERVED!r} for shared values)"
            )
        start_time = data.data_session_start_time
        if start_time is None:  # decode refuses these: a session is filed under its start
            raise ValueError(f"{event.kind.value} event lacks data.data_session_start_time")
        start = unix_seconds(start_time)
        start_day = hour_of(start)[:8]
        win_start = win_end = end = down = up = cum_down = cum_up = totals = 0
        hour = ""
        if code:
            window_start = data.data_session_update_start_time
            window_end = data.data_session_update_end_time
            if window_start is None or window_end is None:  # decode refuses these too
                raise ValueError(f"{event.kind.value} event lacks its update window")
            win_start, win_end = unix_seconds(window_start), unix_seconds(window_end)
            hour = hour_of(win_end)
            down, up = data.data_download or 0, data.data_upload or 0
            cd, cu = data.data_session_data_download, data.data_session_data_upload
            if cd is not None and cu is not None:
                cum_down, cum_up, totals = cd, cu, 1
            end_time = data.data_session_end_time
            end = unix_seconds(end_time) if end_time is not None else win_end
        net, group = texts.group(data.network, data.rat_type)
        number = fields.get(session)
        if number is None:
            number = len(fields) + 1 if _STANDARD_SID.fullmatch(session) else 0
            if number:
                fields[session] = number
        # Texts are numbered in this order (sim, session, day, hour, fleet, account,
        # network, group, place, IMEI), as the script's list of texts holds them.
        sim_n, session_n = numbers[data.sim_sid], numbers[session]
        day_n, hour_n = numbers[start_day], numbers[hour]
        fleet_n, account_n = numbers[_text(data.fleet_sid)], numbers[_text(data.account_sid)]
        net_n, group_n = numbers[net], numbers[group]
        where_n, imei_n = numbers[texts.place(data.location)], numbers[_text(data.imei)]
        out.append(
            (
                code,
                sim_n,
                session_n,
                day_n,
                start,
                win_start,
                win_end,
                hour_n,
                down,
                up,
                cum_down,
                cum_up,
                end,
                fleet_n,
                account_n,
                net_n,
                group_n,
                where_n,
                imei_n,
                number,
                totals,
            )
        )
    blob = b"".join(records.BINARY_SID + bytes.fromhex(sid[2:]) for sid in fields)
    return Encoded(out, blob, list(numbers))


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
        self._texts = _Texts()
        self._log = structlog.get_logger("worker.handlers.metering.handler")
        self.windows_counted = 0
        self.unchanged = 0

    async def handle(self, batch: Batch) -> None:
        encoded, sids, texts = encode(batch.events, self._texts, batch.kinds)
        if not encoded:
            return
        # A copy identical to an event earlier in the batch (a duplicate delivery, the same
        # event in both vendors' envelopes) counts no byte the first did not: the script
        # never sees it. (Of descriptive fields tied in priority, such as the cell of two
        # copies of one window, the record keeps the last one written; dropping the copy
        # can change which, never a figure.)
        distinct = list(dict.fromkeys(encoded))
        result: Any = await self._script(
            keys=[self._route_key],
            args=[*self._head, pack_events(distinct), sids, texts_argument(texts)],
        )
        counted = int(result[0])
        unchanged = int(result[1]) + len(encoded) - len(distinct)
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
        """Refuse data written by a newer layout (``LAYOUT``), then record this one; warn
        when metering does not keep its session records for the stream's retention plus
        ``SESSION_MARGIN_HOURS``: a replay or backfill reaching further back, or a duplicate
        written that much later, would count those windows again."""
        layout_key = f"{self._prefix}:m:layout"
        found = await self._redis.get(layout_key)
        if found is not None and int(found) > LAYOUT:
            raise ConfigError(
                f"metering: {layout_key} says its data was written by a newer release "
                f"(layout {int(found)}; this release reads up to {LAYOUT}): run that release "
                "or a newer one; an older one would count events again"
            )
        if found is None or int(found) < LAYOUT:
            await self._redis.set(layout_key, LAYOUT)
        hours, days = stream.retention_hours, self.settings.session_retention_days
        if hours is not None and hours + SESSION_MARGIN_HOURS > days * 24:
            self._log.warning(
                "metering_session_retention_shorter_than_stream",
                stream_retention_hours=hours,
                session_retention_days=days,
                needed_days=-(-(hours + SESSION_MARGIN_HOURS) // 24),
                fix="raise SUPERSIM_METERING__SESSION_RETENTION_DAYS to the stream's "
                "retention plus a day, or never replay further back than it",
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
