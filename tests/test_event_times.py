"""``worker.events.times`` gives the same Unix times as ``datetime.timestamp()``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from worker.events.records import Envelope
from worker.events.times import unix_ms, unix_seconds

MOMENTS = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


def _parsed(moment: datetime) -> datetime:
    """``moment`` as the models hold it: parsed from RFC 3339 (pydantic-core's UTC)."""
    text = moment.isoformat().replace("+00:00", "Z")
    raw = {"specversion": "1.0", "type": "t", "source": "s", "id": "i", "time": text}
    envelope = Envelope.model_validate_json(orjson.dumps(raw))
    assert envelope.time is not None
    return envelope.time


@given(MOMENTS)
def test_parsed_times_agree_with_timestamp(moment: datetime) -> None:
    parsed = _parsed(moment)
    assert parsed.tzinfo is not UTC  # the case these functions are for
    assert unix_seconds(parsed) == int(moment.timestamp())
    assert unix_ms(parsed) == round(moment.timestamp() * 1000) or (
        # the float product can be off by one exactly at a half millisecond
        moment.microsecond % 1000 == 500
    )


@given(MOMENTS)
def test_stdlib_utc_and_other_zones_agree(moment: datetime) -> None:
    east = moment.astimezone(timezone(timedelta(hours=5, minutes=30)))
    for value in (moment, east):
        assert unix_seconds(value) == int(moment.timestamp())
        assert abs(unix_ms(value) - moment.timestamp() * 1000) <= 0.5


def test_halves_round_to_even() -> None:
    base = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    whole = int(base.timestamp()) * 1000
    assert unix_ms(base.replace(microsecond=500)) == whole
    assert unix_ms(base.replace(microsecond=1500)) == whole + 2
    assert unix_ms(base.replace(microsecond=1499)) == whole + 1
    assert unix_seconds(datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)) == 0
