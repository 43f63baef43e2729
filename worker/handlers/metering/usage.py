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

from worker.handlers.metering.handler import (
    DEFAULTS_FIELD,
    daily_key,
    hourly_key,
    session_bytes,
    sessions_key,
    unpack_record,
)

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
                hh = f"{hour:02d}"
                rows.append(
                    Usage(
                        f"{day.isoformat()}T{hh}:00Z",
                        int(hours.get(hh + "d", 0)),
                        int(hours.get(hh + "u", 0)),
                    )
                )
        else:
            month = stored[daily_key(prefix, dimension, ident, day.strftime("%Y%m"))]
            dd = day.strftime("%d")
            rows.append(
                Usage(day.isoformat(), int(month.get(dd + "d", 0)), int(month.get(dd + "u", 0)))
            )
    return rows


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def session_resource(sim_sid: str, sid: str, packed: str, defaults: str = "") -> dict[str, Any]:
    """A stored session record in the shape of the DataSession resource, plus the fleet and
    the bytes (instead of packet counts). ``operator_country`` is the event's ISO 3166
    alpha-2 code; location and IMEI are the latest the session's events reported."""
    rec = unpack_record(packed, defaults)
    start = int(rec.get("start") or 0)
    down, up = session_bytes(rec)
    priorities = [int(rec[name]) for name in ("opri", "lpri", "ipri") if rec.get(name)]
    end = rec.get("end")
    lat, lon = rec.get("lat"), rec.get("lon")
    return {
        "sid": sid,
        "sim_sid": sim_sid,
        "account_sid": rec.get("account") or None,
        "fleet_sid": rec.get("fleet") or None,
        "radio_link": rec.get("rat") or None,
        "operator_mcc": rec.get("mcc") or None,
        "operator_mnc": rec.get("mnc") or None,
        "operator_country": rec.get("country") or None,
        "operator_name": rec.get("operator") or None,
        "cell_id": rec.get("cell") or None,
        "cell_location_estimate": {"lat": float(lat), "lon": float(lon)} if lat and lon else None,
        "imei": rec.get("imei") or None,
        "start": _iso(start),
        "end": _iso(start + int(end)) if end else None,
        "last_updated": _iso(start + max(priorities) // 2) if priorities else _iso(start),
        "data_download": down,
        "data_upload": up,
        "data_total": down + up,
    }


def sessions(
    client: redis.Redis, prefix: str, sim_sid: str, first: date, last: date
) -> list[dict[str, Any]]:
    """The data sessions of one SIM that started from ``first`` to ``last`` (UTC dates,
    inclusive), oldest first. One Redis round trip."""
    pipe = client.pipeline(transaction=False)
    for day in _days(first, last):
        pipe.hgetall(sessions_key(prefix, sim_sid, day.strftime("%Y%m%d")))
    found = []
    for raw in pipe.execute():
        stored = _fields(raw)
        defaults = stored.pop(DEFAULTS_FIELD, "")
        found += [
            session_resource(sim_sid, sid, packed, defaults) for sid, packed in stored.items()
        ]
    found.sort(key=lambda item: (item["start"], item["sid"]))
    return found
