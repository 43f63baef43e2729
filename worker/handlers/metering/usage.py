"""The read side of metering: usage figures and data sessions, read back from Redis.

What :mod:`worker.handlers.metering.handler` stored, as plain values: bytes down and up
per UTC day or hour for a SIM, fleet, account or network (:func:`figures`), and one SIM's
data sessions shaped like the DataSession resource (:func:`sessions`). Each call is one
Redis round trip. No settings and no command line: the caller brings a client and the
stream's key prefix (``worker.keys.prefix``). ``supersim-worker usage`` formats the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import redis

from worker.handlers.metering.keys import (
    daily_key,
    hourly_key,
    legacy_sessions_key,
    sessions_key,
)
from worker.handlers.metering.records import StoredSession, read_sessions

SESSION_COLUMNS: Final = (
    "sid",
    "start",
    "end",
    "radio_link",
    "operator_name",
    "operator_country",
    "operator_mcc",
    "operator_mnc",
    "cell_id",
    "lat",
    "lon",
    "imei",
    "data_download",
    "data_upload",
    "data_total",
)


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes in one period (a UTC day ``YYYY-MM-DD`` or hour ``YYYY-MM-DDTHH:00Z``)."""

    period: str
    down: int
    up: int

    @property
    def total(self) -> int:
        return self.down + self.up

    def as_dict(self) -> dict[str, Any]:
        return {"period": self.period, "down": self.down, "up": self.up, "total": self.total}


def _days(first: date, last: date) -> Iterator[date]:
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _bucket(fields: dict[str, str], period: int) -> tuple[int, int]:
    """(down, up) of one hour or day of a bucket hash: fields ``P``/``P + 100``, plus the
    previous layout's ``PPd``/``PPu`` (a hash written across the change holds both)."""
    legacy = f"{period:02d}"
    return (
        int(fields.get(str(period), 0)) + int(fields.get(legacy + "d", 0)),
        int(fields.get(str(period + 100), 0)) + int(fields.get(legacy + "u", 0)),
    )


def figures(
    client: redis.Redis,
    prefix: str,
    dimension: str,
    ident: str,
    first: date,
    last: date,
    *,
    hourly: bool = False,
) -> list[Usage]:
    """Usage of one SIM, fleet, account or network per day (or hour) from ``first`` to
    ``last`` inclusive, zeros included. One Redis round trip."""
    days = list(_days(first, last))
    if hourly:
        names = [hourly_key(prefix, dimension, ident, d.strftime("%Y%m%d")) for d in days]
    else:
        months = sorted({d.strftime("%Y%m") for d in days})
        names = [daily_key(prefix, dimension, ident, month) for month in months]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    stored = dict(zip(names, (_fields(raw) for raw in pipe.execute()), strict=True))
    rows: list[Usage] = []
    for day in days:
        if hourly:
            hours = stored[hourly_key(prefix, dimension, ident, day.strftime("%Y%m%d"))]
            for hour in range(24):
                down, up = _bucket(hours, hour)
                rows.append(Usage(f"{day.isoformat()}T{hour:02d}:00Z", down, up))
        else:
            month = stored[daily_key(prefix, dimension, ident, day.strftime("%Y%m"))]
            down, up = _bucket(month, day.day)
            rows.append(Usage(day.isoformat(), down, up))
    return rows


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def session_resource(sim_sid: str, session: StoredSession) -> dict[str, Any]:
    """A stored session in the shape of the DataSession resource, plus the fleet and the
    bytes (instead of packet counts). ``operator_country`` is the event's ISO 3166 alpha-2
    code; location and IMEI are the latest the session's events reported."""
    operator, location = session.operator, session.location
    lat, lon = location.get("lat"), location.get("lon")
    return {
        "sid": session.sid,
        "sim_sid": sim_sid,
        "account_sid": session.account or None,
        "fleet_sid": session.fleet or None,
        "radio_link": operator["rat"] or None,
        "operator_mcc": operator["mcc"] or None,
        "operator_mnc": operator["mnc"] or None,
        "operator_country": operator["country"] or None,
        "operator_name": operator["operator"] or None,
        "cell_id": location.get("cell") or None,
        "cell_location_estimate": {"lat": float(lat), "lon": float(lon)} if lat and lon else None,
        "imei": session.imei or None,
        "start": _iso(session.start),
        "end": _iso(session.end) if session.end is not None else None,
        "last_updated": _iso(session.last_updated),
        "data_download": session.down,
        "data_upload": session.up,
        "data_total": session.down + session.up,
    }


def sessions(
    client: redis.Redis, prefix: str, sim_sid: str, first: date, last: date
) -> list[dict[str, Any]]:
    """The data sessions of one SIM that started from ``first`` to ``last`` (UTC dates,
    inclusive), oldest first, from both key layouts. One Redis round trip (a transaction,
    so a record the handler moves between layouts meanwhile is seen once)."""
    days = list(_days(first, last))
    pipe = client.pipeline(transaction=True)
    for day in days:
        stamp = day.strftime("%Y%m%d")
        pipe.hgetall(sessions_key(prefix, sim_sid, stamp))
        pipe.hgetall(legacy_sessions_key(prefix, sim_sid, stamp))
    replies = pipe.execute()
    found = []
    for n, day in enumerate(days):
        midnight = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        stored = read_sessions(replies[2 * n], replies[2 * n + 1], midnight)
        found += [session_resource(sim_sid, session) for session in stored]
    found.sort(key=lambda item: (item["start"], item["sid"]))
    return found
