"""``worker.events.times`` gives the same Unix times as ``datetime.timestamp()``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
from hypothesis import given
from hypothesis import strategies as st

from worker.events.records import Envelope
from worker.events.times import unix_ms, unix_seconds

MOMENTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
EVENT_MOMENTS = st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
"""The times events may carry (``worker.events.records.EARLIEST_YEAR`` on)."""
HALF_MS = st.builds(
    lambda moment, ms: moment.replace(microsecond=ms * 1000 + 500),
    MOMENTS,
    st.integers(min_value=0, max_value=999),
)
"""Times at exactly half a millisecond, where the float product of ``timestamp()`` rounds
either way."""


def _parsed(moment: datetime) -> datetime:
    """``moment`` as the models hold it: parsed from RFC 3339 (pydantic-core's UTC)."""
    text = moment.isoformat().replace("+00:00", "Z")
    raw = {"specversion": "1.0", "type": "t", "source": "s", "id": "i", "time": text}
    envelope = Envelope.model_validate_json(orjson.dumps(raw))
    assert envelope.time is not None
    return envelope.time


@given(EVENT_MOMENTS | HALF_MS.filter(lambda moment: moment.year >= 1970))
def test_parsed_times_agree_with_timestamp(moment: datetime) -> None:
    parsed = _parsed(moment)
    assert parsed.tzinfo is not UTC  # the case these functions are for
    assert unix_seconds(parsed) == int(moment.timestamp())
    assert unix_ms(parsed) == round(moment.timestamp() * 1000)


@given(MOMENTS | HALF_MS)
def test_stdlib_utc_agrees_with_timestamp(moment: datetime) -> None:
    assert unix_seconds(moment) == int(moment.timestamp())
    assert unix_ms(moment) == round(moment.timestamp() * 1000)


@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)))
def test_other_zones_are_converted(moment: datetime) -> None:
    east = moment.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert unix_seconds(east) == int(east.timestamp())
    assert unix_ms(east) == round(east.timestamp() * 1000)


def test_the_review_cases() -> None:
    """Half milliseconds where the double product rounds up or down, a time in the year 3000
    a microsecond before a second, and one before 1970."""
    for text in (
        "2038-06-01T00:00:00.000500",
        "2004-07-16T23:25:06.324500",
        "3000-06-01T00:00:00.999999",
        "1969-12-31T23:59:59.500000",
    ):
        moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
        for value in (moment, _parsed(moment)):
            assert unix_seconds(value) == int(moment.timestamp())
            assert unix_ms(value) == round(moment.timestamp() * 1000)


def test_naive_datetimes_are_local_time_as_timestamp_reads_them() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 250_500)
    assert unix_seconds(moment) == int(moment.timestamp())
    assert unix_ms(moment) == round(moment.timestamp() * 1000)


def test_the_epoch_shares_the_models_tzinfo() -> None:
    """The fast case: the models' parsed times and the epoch subtract without asking their
    tzinfo (one object). Were it not so, the figures would be the same, only slower."""
    from worker.events.times import _EPOCH

    assert _parsed(datetime(2024, 5, 1, tzinfo=UTC)).tzinfo is _EPOCH.tzinfo


def test_naive_datetimes_in_a_gap_or_fold_read_as_timestamp_reads_them() -> None:
    """Local time is timestamp()'s to read (a zone's gaps and folds included)."""
    for moment in (
        datetime(2024, 3, 10, 2, 30),
        datetime(2024, 11, 3, 1, 30, fold=1),
        datetime(9999, 12, 31, 23, 0),
    ):
        try:
            expected = moment.timestamp()
        except (OverflowError, ValueError):
            continue
        assert unix_seconds(moment) == int(expected)
        assert unix_ms(moment) == round(expected * 1000)
