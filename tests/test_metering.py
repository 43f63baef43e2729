"""The ``metering`` handler: byte-exact usage against the simulator's ground truth, whatever
the order, duplicates, replays, replicas and subscription."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import date, datetime, timedelta
from typing import Any, cast

import orjson
import pytest
import redis
import redis.asyncio
from events import SIM, make_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from worker.devtools.simulator import SimulationOptions, generate
from worker.devtools.simulator.catalog import NETWORKS
from worker.errors import ConfigError, is_infrastructure_failure
from worker.events.decode import decode
from worker.events.records import ConnectionEvent
from worker.handlers import registry
from worker.handlers.base import Batch, HandlerContext, StreamFacts
from worker.handlers.metering.handler import LAYOUT, MeteringHandler, create, encode
from worker.handlers.metering.keys import hourly_key, legacy_sessions_key, sessions_key
from worker.handlers.metering.settings import MeteringSettings
from worker.handlers.metering.usage import figures, sessions

PREFIX = "{sw:test-stream:test-group}"
DAY = 86_400


# --- simulated streams --------------------------------------------------------------------


@functools.cache
def simulated(**options: Any) -> tuple[tuple[ConnectionEvent, ...], dict[str, Any]]:
    """Decoded connection events of a simulated stream (in stream order) and its truth."""
    base: dict[str, Any] = {"sims": 30, "hours": 30.0, "seed": 7}
    records, truth = generate(SimulationOptions(**(base | options)))
    events = tuple(e for e in map(decode, records) if isinstance(e, ConnectionEvent))
    return events, truth


def batches(events: Sequence[ConnectionEvent], rng: random.Random) -> list[Batch]:
    """The events cut into batches of random sizes (1 to 400)."""
    out, i = [], 0
    while i < len(events):
        size = rng.randint(1, 400)
        out.append(Batch("shardId-000000000000", events[i : i + size]))
        i += size
    return out


def shuffled(
    events: Sequence[ConnectionEvent], seed: int, extra_duplicates: float = 0.0
) -> list[ConnectionEvent]:
    """A random permutation of the events, with a share of them delivered once more."""
    rng = random.Random(seed)
    out = list(events) + [e for e in events if rng.random() < extra_duplicates]
    rng.shuffle(out)
    return out


def period(truth: dict[str, Any]) -> tuple[date, date]:
    options = truth["options"]
    start = datetime.fromisoformat(options["start"])
    end = start + timedelta(hours=options["hours"])
    return start.date(), end.date()


def _nonzero(table: dict[str, dict[str, int]]) -> dict[str, tuple[int, int]]:
    return {k: (v["down"], v["up"]) for k, v in table.items() if v["down"] or v["up"]}


def expected(truth: dict[str, Any]) -> dict[str, Any]:
    """The truth's usage tables as {key: (down, up)}, zero entries left out."""
    usage = truth["usage"]
    out: dict[str, Any] = {
        name: _nonzero(usage[name]) for name in ("per_fleet", "per_account", "per_network")
    }
    out["per_day"] = _nonzero(usage["per_day"])
    for name in ("per_sim_day", "per_sim_hour"):
        out[name] = {sim: _nonzero(inner) for sim, inner in usage[name].items()}
        out[name] = {sim: inner for sim, inner in out[name].items() if inner}
    return out


def metered(client: redis.Redis, truth: dict[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """What Redis holds, read with ``figures`` (metering's read side), shaped like ``expected``."""
    first, last = period(truth)

    def rows(dimension: str, ident: str, hourly: bool = False) -> dict[str, tuple[int, int]]:
        found = figures(client, prefix, dimension, ident, first, last, hourly=hourly)
        return {r.period[:13]: (r.down, r.up) for r in found if r.down or r.up}

    def totals(dimension: str, idents: set[str]) -> dict[str, tuple[int, int]]:
        out = {}
        for ident in sorted(idents):
            found = rows(dimension, ident)
            down, up = sum(v[0] for v in found.values()), sum(v[1] for v in found.values())
            if down or up:
                out[ident] = (down, up)
        return out

    sims = truth["sims"]
    per_day: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    accounts = {s["account_sid"] for s in sims.values()}
    for account in accounts:
        for day, (down, up) in rows("account", account).items():
            per_day[day][0] += down
            per_day[day][1] += up
    out: dict[str, Any] = {
        "per_fleet": totals("fleet", {s["fleet_sid"] for s in sims.values()}),
        "per_account": totals("account", accounts),
        "per_network": totals("network", {n.key for n in NETWORKS} | {"unknown"}),
        "per_day": {day: (v[0], v[1]) for day, v in per_day.items()},
        "per_sim_day": {},
        "per_sim_hour": {},
    }
    for sim in sims:
        if daily := rows("sim", sim):
            out["per_sim_day"][sim] = daily
        if hourly := rows("sim", sim, hourly=True):
            out["per_sim_hour"][sim] = hourly
    return out


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    connection = redis.asyncio.Redis.from_url(redis_url)
    yield connection
    await connection.aclose()


@pytest.fixture
def reader(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def handler(connection: redis.asyncio.Redis, **settings: int) -> MeteringHandler:
    return MeteringHandler(connection, PREFIX, MeteringSettings(**settings))


async def handle_all(target: MeteringHandler, parts: Sequence[Batch]) -> None:
    for part in parts:
        await target.handle(part)


def record_events(*records: bytes) -> list[ConnectionEvent]:
    out = [decode(raw) for raw in records]
    assert all(isinstance(e, ConnectionEvent) for e in out)
    return cast(list[ConnectionEvent], out)


# --- exactness -----------------------------------------------------------------------------

MESSY: dict[str, Any] = {
    "duplicate_share": 0.3,
    "shuffle_window": 3600,
    "kore_share": 0.4,
    "data_as_string_share": 0.2,
    "schema_version": "mixed",
}


@pytest.mark.parametrize("seed", [1, 2])
async def test_totals_equal_ground_truth_for_any_permutation_with_duplicates(
    client: redis.asyncio.Redis, reader: redis.Redis, seed: int
) -> None:
    """Shuffled, duplicated, mixed v1/v2, both vendors: every table equals the truth to the byte."""
    events, truth = simulated(**MESSY)
    stream = shuffled(events, seed, extra_duplicates=0.2)
    await handle_all(handler(client), batches(stream, random.Random(seed)))
    assert metered(reader, truth) == expected(truth)


async def test_v1_stream_is_exact_per_hour(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Schema v1 (no cumulative totals) windows are de-duplicated by session and window."""
    events, truth = simulated(schema_version=1, duplicate_share=0.5)
    await handle_all(handler(client), batches(shuffled(events, 3, 0.5), random.Random(3)))
    assert metered(reader, truth) == expected(truth)


async def test_ended_only_equals_updated_and_ended_per_sim_and_day(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """With v2 events, metering ended events alone gives the same daily totals per SIM."""
    full, truth = simulated(duplicate_share=0.2)
    ended_only, ended_truth = simulated(duplicate_share=0.2, subscription="ended-only")
    assert ended_truth["ended_only_exact"]
    await handle_all(handler(client), batches(shuffled(full, 4), random.Random(4)))
    other = MeteringHandler(client, "{sw:test-stream:ended-only}", MeteringSettings())
    await handle_all(other, batches(shuffled(ended_only, 5), random.Random(5)))
    both = metered(reader, truth)
    alone = metered(reader, truth, prefix="{sw:test-stream:ended-only}")
    for table in ("per_sim_day", "per_fleet", "per_account", "per_network", "per_day"):
        assert alone[table] == both[table] == expected(truth)[table], table


async def test_ended_only_puts_each_session_in_the_hour_it_ended(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Under ended-only, a session's cumulative bytes land in the UTC hour of its end."""
    events, truth = simulated(subscription="ended-only")
    await handle_all(handler(client), batches(events, random.Random(6)))
    hours: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for session in truth["sessions"].values():
        if session["end"] and session["total"]:
            pair = hours[session["sim_sid"]][session["end"][:13]]
            pair[0] += session["down"]
            pair[1] += session["up"]
    want = {sim: {h: (v[0], v[1]) for h, v in inner.items()} for sim, inner in hours.items()}
    assert metered(reader, truth)["per_sim_hour"] == want


async def test_late_updated_events_move_bytes_from_the_ended_hour_to_their_own(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Ended events first, their updated events after: the hourly buckets end up exact."""
    events, truth = simulated()
    ended = [e for e in events if e.kind.value != "data-session.updated"]
    updated = [e for e in events if e.kind.value == "data-session.updated"]
    target = handler(client)
    await handle_all(target, batches(ended, random.Random(7)))
    await handle_all(target, batches(shuffled(updated, 8), random.Random(8)))
    assert metered(reader, truth) == expected(truth)


async def test_two_replicas_on_the_same_events_concurrently_stay_exact(
    redis_url: str, reader: redis.Redis
) -> None:
    """Two handlers on two connections, handling the same events interleaved, count each once."""
    events, truth = simulated(**MESSY)
    first = redis.asyncio.Redis.from_url(redis_url)
    second = redis.asyncio.Redis.from_url(redis_url)
    try:
        one, two = handler(first), handler(second)
        await asyncio.gather(
            handle_all(one, batches(shuffled(events, 9), random.Random(9))),
            handle_all(two, batches(shuffled(events, 10), random.Random(10))),
        )
    finally:
        await first.aclose()
        await second.aclose()
    assert metered(reader, truth) == expected(truth)


def snapshot(client: redis.Redis) -> dict[bytes, dict[bytes, bytes]]:
    return {key: client.hgetall(key) for key in client.scan_iter(match=PREFIX + ":m:*")}


async def test_copies_identical_to_an_earlier_event_of_the_batch_never_reach_the_script(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """An event repeated in its batch is counted once and the repeats as unchanged, and
    Redis holds what one copy leaves."""
    events, _ = simulated()
    sample = [e for e in events if e.kind.carries_usage][:5]
    once = handler(client)
    await once.handle(Batch("s", sample))
    expected = snapshot(reader)
    reader.flushall()
    repeated = handler(client)
    await repeated.handle(Batch("s", [e for e in sample for _ in range(3)]))
    assert snapshot(reader) == expected
    assert repeated.windows_counted == once.windows_counted
    assert repeated.unchanged == once.unchanged + 2 * len(sample)


async def test_crash_replay_of_a_prefix_of_batches_changes_nothing(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Re-handling batches already handled (a replay after kill -9) leaves Redis unchanged."""
    events, truth = simulated(**MESSY)
    parts = batches(events, random.Random(11))
    cut = len(parts) * 2 // 3
    target = handler(client)
    await handle_all(target, parts[:cut])
    before = snapshot(reader)
    await handle_all(handler(client), parts[cut // 3 : cut])
    assert snapshot(reader) == before
    await handle_all(target, parts[cut // 2 :])
    assert metered(reader, truth) == expected(truth)


async def test_session_crossing_midnight_goes_to_the_ended_day_under_ended_only(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Documented limit: per-window days with updated events, the ended day without them."""

    def usage(kind: str, seq: int, start: str, end: str, down: int, cum: int) -> bytes:
        extra: dict[str, Any] = {"data_session_end_time": end} if kind.endswith("ended") else {}
        return make_record(
            f"data-session.{kind}",
            seq=seq,
            data_session_start_time="2024-03-01T23:50:00Z",
            data_session_update_start_time=start,
            data_session_update_end_time=end,
            timestamp=end,
            data_download=down,
            data_upload=0,
            data_total=down,
            data_session_data_download=cum,
            data_session_data_upload=0,
            data_session_data_total=cum,
            **extra,
        )

    windows = record_events(
        usage("updated", 1, "2024-03-01T23:50:00Z", "2024-03-01T23:56:00Z", 100, 100),
        usage("updated", 2, "2024-03-01T23:56:00Z", "2024-03-02T00:02:00Z", 200, 300),
        usage("ended", 3, "2024-03-02T00:02:00Z", "2024-03-02T00:05:00Z", 50, 350),
    )
    await handler(client).handle(Batch("s", windows))
    alone = MeteringHandler(client, "{sw:test-stream:ended-only}", MeteringSettings())
    await alone.handle(Batch("s", windows[2:]))
    sim = windows[0].data.sim_sid
    days = (date(2024, 3, 1), date(2024, 3, 2))
    assert [r.down for r in figures(reader, PREFIX, "sim", sim, *days)] == [100, 250]
    ended_only = figures(reader, "{sw:test-stream:ended-only}", "sim", sim, *days)
    assert [r.down for r in ended_only] == [0, 350]


async def test_v1_copy_of_an_ended_event_is_upgraded_by_its_v2_copy(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """An ended event first seen without cumulative totals, then with them, counts the session."""
    v1, v2 = record_events(
        make_record("data-session.ended", schema_version=1),
        make_record("data-session.ended", vendor="kore"),
    )
    target = handler(client)
    await target.handle(Batch("s", [v1]))
    sim = v1.data.sim_sid
    day = date(2022, 12, 14)
    assert figures(reader, PREFIX, "sim", sim, day, day)[0].down == v1.data.data_download
    await target.handle(Batch("s", [v2, v1]))
    assert (
        figures(reader, PREFIX, "sim", sim, day, day)[0].down == v2.data.data_session_data_download
    )


# --- one session, any delivery (property) -------------------------------------------------

SESSION_START = datetime(2024, 3, 1, 22, 10)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def session_records(
    windows: Sequence[tuple[int, int]], schema: int, start: datetime = SESSION_START
) -> list[bytes]:
    """started, one updated per window but the last, ended for the last: 20-minute windows
    from ``start`` (22:10 UTC), so they span several hours and cross midnight."""
    out = [
        make_record(
            "data-session.started",
            seq=0,
            schema_version=schema,
            timestamp=_iso(start),
            data_session_start_time=_iso(start),
        )
    ]
    cum = [0, 0]
    for n, (down, up) in enumerate(windows):
        begin, end = (
            start + timedelta(minutes=20 * n),
            start + timedelta(minutes=20 * (n + 1)),
        )
        cum = [cum[0] + down, cum[1] + up]
        kind = "data-session.ended" if n == len(windows) - 1 else "data-session.updated"
        fields: dict[str, Any] = {
            "timestamp": _iso(end),
            "data_session_start_time": _iso(start),
            "data_session_update_start_time": _iso(begin),
            "data_session_update_end_time": _iso(end),
            "data_download": down,
            "data_upload": up,
            "data_total": down + up,
        }
        if schema == 2:
            fields |= {
                "data_session_data_download": cum[0],
                "data_session_data_upload": cum[1],
                "data_session_data_total": sum(cum),
            }
        if kind == "data-session.ended":
            fields["data_session_end_time"] = _iso(end)
        out.append(make_record(kind, seq=n + 1, schema_version=schema, **fields))
    return out


def _hour(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    windows=st.lists(
        st.tuples(st.integers(0, 10**9), st.integers(0, 10**6)), min_size=1, max_size=7
    ),
    schema=st.sampled_from([1, 2]),
    data=st.data(),
)
def test_any_subset_order_and_repetition_of_a_sessions_events_meters_the_invariant(
    redis_url: str, windows: list[tuple[int, int]], schema: int, data: st.DataObject
) -> None:
    """Buckets = each distinct updated window in its hour + (cumulative - those) in the ended hour."""
    records = session_records(windows, schema)
    picked = data.draw(st.lists(st.sampled_from(range(len(records))), max_size=3 * len(records)))
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=len(picked), max_size=len(picked)))
    replicas = data.draw(st.sampled_from([1, 2]))
    events = record_events(*(records[i] for i in picked))
    prefix = "{sw:property:" + uuid.uuid4().hex + "}"

    async def deliver() -> None:
        connections = [redis.asyncio.Redis.from_url(redis_url) for _ in range(replicas)]
        try:
            handlers = [MeteringHandler(c, prefix, MeteringSettings()) for c in connections]
            parts, i = [], 0
            for size in sizes:
                if i >= len(events):
                    break
                parts.append(Batch("s", events[i : i + size]))
                i += size
            await asyncio.gather(
                *(handle_all(h, parts[n::replicas]) for n, h in enumerate(handlers))
            )
        finally:
            for connection in connections:
                await connection.aclose()

    asyncio.run(deliver())
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    seen = {i - 1 for i in picked if i > 0}  # window numbers delivered
    last = len(windows) - 1
    for n in seen - {last}:
        pair = want[_hour(SESSION_START + timedelta(minutes=20 * (n + 1)))]
        pair[0] += windows[n][0]
        pair[1] += windows[n][1]
    if last in seen:
        pair = want[_hour(SESSION_START + timedelta(minutes=20 * (last + 1)))]
        if schema == 2:
            pair[0] += sum(w[0] for w in windows) - sum(windows[n][0] for n in seen - {last})
            pair[1] += sum(w[1] for w in windows) - sum(windows[n][1] for n in seen - {last})
        else:
            pair[0] += windows[last][0]
            pair[1] += windows[last][1]
    reader = redis.Redis.from_url(redis_url)
    try:
        sim = SIM["sim_sid"]
        rows = figures(reader, prefix, "sim", sim, date(2024, 3, 1), date(2024, 3, 2), hourly=True)
        got = {r.period[:13]: [r.down, r.up] for r in rows if r.down or r.up}
        assert got == {h: v for h, v in want.items() if v != [0, 0]}
        listed = sessions(reader, prefix, sim, date(2024, 3, 1), date(2024, 3, 1))
        assert len(listed) == (1 if picked else 0)
        if listed:
            total = [sum(v[0] for v in want.values()), sum(v[1] for v in want.values())]
            assert [listed[0]["data_download"], listed[0]["data_upload"]] == total
    finally:
        reader.close()


@pytest.mark.parametrize(
    "start",
    [
        datetime(2023, 12, 31, 22, 10),
        datetime(2024, 2, 28, 22, 10),
        datetime(2024, 2, 29, 22, 10),
        datetime(2000, 2, 28, 22, 10),
        datetime(2100, 2, 28, 22, 10),
        datetime(1999, 12, 31, 22, 10),
    ],
    ids=lambda moment: moment.date().isoformat(),
)
async def test_late_windows_leave_the_ended_hour_exact_across_month_and_year_ends(
    client: redis.asyncio.Redis, reader: redis.Redis, start: datetime
) -> None:
    """The script names a session's ended hour from its start: with the ended event first,
    each late window moves its bytes out of the right hour, past a month's, a leap day's
    and a year's end."""
    windows = [(100 * n, 10 * n) for n in range(1, 8)]
    *started_and_updated, ended = record_events(*session_records(windows, 2, start))
    target = handler(client)
    await target.handle(Batch("s", [ended]))
    for event in started_and_updated:
        await target.handle(Batch("s", [event]))
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for n, (down, up) in enumerate(windows):
        pair = want[_hour(start + timedelta(minutes=20 * (n + 1)))]
        pair[0] += down
        pair[1] += up
    last = start + timedelta(minutes=20 * len(windows))
    rows = figures(reader, PREFIX, "sim", SIM["sim_sid"], start.date(), last.date(), hourly=True)
    assert {r.period[:13]: [r.down, r.up] for r in rows if r.down or r.up} == want
    assert len(want) == 3


# --- copies of an ended event that name another fleet, account or network ---------------

OTHER_FLEET = "HF" + "0" * 32
OTHER_ACCOUNT = "AC" + "0" * 32
GROUPS: dict[str, tuple[str, ...]] = {
    "sim": (SIM["sim_sid"],),
    "fleet": (SIM["fleet_sid"], OTHER_FLEET),
    "account": (SIM["account_sid"], OTHER_ACCOUNT),
    "network": ("US-310-260", "US-999-260"),
}
GROUP_DAY = date(2024, 3, 1)


def group_window(
    kind: str,
    *,
    schema: int = 2,
    vendor: str = "twilio",
    other_group: bool = False,
    sid: str | None = None,
) -> bytes:
    """One session of 1,000/100 bytes: its updated window (10:00-10:40 UTC, 600/60 bytes)
    or its ended window (10:40-11:10, 400/40), on US-310-260 of the SIM's fleet and account,
    or with ``other_group`` on US-999-260 of another fleet and account."""
    ended = kind == "ended"
    begin, end = ("10:40", "11:10") if ended else ("10:00", "10:40")
    down, up = (400, 40) if ended else (600, 60)
    fields: dict[str, Any] = {
        "timestamp": f"2024-03-01T{end}:00Z",
        "data_session_start_time": "2024-03-01T10:00:00Z",
        "data_session_update_start_time": f"2024-03-01T{begin}:00Z",
        "data_session_update_end_time": f"2024-03-01T{end}:00Z",
        "data_download": down,
        "data_upload": up,
        "data_total": down + up,
    }
    if schema == 2:
        fields |= {
            "data_session_data_download": 1000 if ended else 600,
            "data_session_data_upload": 100 if ended else 60,
            "data_session_data_total": 1100 if ended else 660,
        }
    if ended:
        fields["data_session_end_time"] = f"2024-03-01T{end}:00Z"
    if other_group:
        fields |= {"network__mcc": "999", "fleet_sid": OTHER_FLEET, "account_sid": OTHER_ACCOUNT}
    if sid is not None:
        fields["data_session_sid"] = sid
    return make_record(
        f"data-session.{kind}",
        vendor=vendor,
        schema_version=schema,
        seq=2 if ended else 1,
        **fields,
    )


async def metered_groups(
    client: redis.asyncio.Redis,
    reader: redis.Redis,
    records: Sequence[bytes],
    batch_size: int,
    prefix: str | None = None,
) -> tuple[dict[str, dict[str, tuple[int, int]]], list[dict[str, Any]]]:
    """The records metered under ``prefix`` (by default a fresh one): the non-zero hours of
    every SIM, fleet, account and network of ``GROUPS`` (no hour may be negative), and the
    SIM's sessions."""
    prefix = prefix or "{sw:groups:" + uuid.uuid4().hex + "}"
    target = MeteringHandler(client, prefix, MeteringSettings())
    events = record_events(*records)
    for i in range(0, len(events), batch_size):
        await target.handle(Batch("s", events[i : i + batch_size]))
    hours: dict[str, dict[str, tuple[int, int]]] = {}
    for dimension, idents in GROUPS.items():
        for ident in idents:
            rows = figures(reader, prefix, dimension, ident, GROUP_DAY, GROUP_DAY, hourly=True)
            assert all(r.down >= 0 and r.up >= 0 for r in rows), (dimension, ident, rows)
            if found := {r.period[:13]: (r.down, r.up) for r in rows if r.down or r.up}:
                hours[f"{dimension}:{ident}"] = found
    return hours, sessions(reader, prefix, SIM["sim_sid"], GROUP_DAY, GROUP_DAY)


async def test_a_copy_of_a_counted_ended_event_naming_another_group_changes_no_total(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Ended on 310, a copy of it on 999 (other fleet and account), then an updated window:
    every SIM, fleet, account and network total is that of the clean delivery."""
    ended, updated = group_window("ended"), group_window("updated")
    copy = group_window("ended", vendor="kore", other_group=True)
    messy = await metered_groups(client, reader, [ended, copy, updated], batch_size=1)
    clean = await metered_groups(client, reader, [ended, updated], batch_size=1)
    both_hours = {"2024-03-01T10": (600, 60), "2024-03-01T11": (400, 40)}
    assert clean[0] == {
        f"{dimension}:{idents[0]}": both_hours for dimension, idents in GROUPS.items()
    }
    assert messy == clean


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(
    "order",
    [
        *itertools.permutations(("updated", "ended310", "ended999")),
        *itertools.permutations(("ended310", "ended999")),
    ],
    ids="-".join,
)
@pytest.mark.parametrize(
    ("schema_310", "schema_999"), [(2, 2), (1, 2)], ids=["same-schema", "v1-and-v2"]
)
async def test_ended_copies_naming_different_groups_credit_the_first_one_seen_in_any_order(
    client: redis.asyncio.Redis,
    reader: redis.Redis,
    batch_size: int,
    order: tuple[str, ...],
    schema_310: int,
    schema_999: int,
) -> None:
    """Two copies of an ended event on networks 310 and 999 (and two fleets and accounts),
    with or without the updated window, in any order: the ended share goes to the group of
    the ended copy seen first, exactly as if only it (with cumulative totals if either copy
    had them) had been delivered; no bucket is ever negative."""
    copies = {
        "ended310": (schema_310, "twilio", False),
        "ended999": (schema_999, "kore", True),
    }
    records = {
        name: group_window("ended", schema=s, vendor=v, other_group=o)
        for name, (s, v, o) in copies.items()
    }
    records["updated"] = group_window("updated")
    messy = await metered_groups(client, reader, [records[n] for n in order], batch_size)
    seen_first = next(n for n in order if n != "updated")
    clean_ended = group_window(
        "ended", schema=max(schema_310, schema_999), other_group=copies[seen_first][2]
    )
    clean = [records["updated"], clean_ended] if "updated" in order else [clean_ended]
    assert messy == await metered_groups(client, reader, clean, batch_size)


# --- session records -----------------------------------------------------------------------


async def test_session_records_mirror_every_data_session(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Each session's record has its SIM, times, bytes and the ended event's operator and cell."""
    events, truth = simulated(**MESSY)
    await handle_all(handler(client), batches(shuffled(events, 12, 0.3), random.Random(12)))
    first, last = period(truth)
    ended = {
        e.data.data_session_sid: e.data for e in events if e.kind.value == "data-session.ended"
    }
    found = {}
    for sim in truth["sims"]:
        for item in sessions(reader, PREFIX, sim, first, last):
            found[item["sid"]] = item
    assert found.keys() == truth["sessions"].keys()
    for sid, want in truth["sessions"].items():
        item = found[sid]
        got = {k: item[k] for k in ("sim_sid", "start", "end")}
        got |= {
            "down": item["data_download"],
            "up": item["data_upload"],
            "total": item["data_total"],
        }
        assert got == want
        data = ended.get(sid)
        if data is not None and data.network is not None:
            assert item["operator_mcc"] == data.network.mcc
            assert item["operator_name"] == data.network.friendly_name
            assert item["operator_country"] == data.network.iso_country
            assert item["radio_link"] == data.rat_type
            assert item["account_sid"] == data.account_sid
            if data.location is not None and data.location.cell_id:
                assert item["cell_id"] == data.location.cell_id
                assert item["cell_location_estimate"] == {
                    "lat": data.location.lat,
                    "lon": data.location.lon,
                }
            if data.imei:
                assert item["imei"] == data.imei


async def test_previous_layout_data_is_read_counted_against_and_moved(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Buckets and session records of the previous key layout (fields ``HHd``/``DDd``,
    session hashes ``P:m:s:``) are read and added in, a window they counted is not counted
    again, and a record moves to the new hash when its session changes: the figures and the
    listing equal those of one delivery to the new layout."""
    updated, ended = group_window("updated"), group_window("ended")
    clean = await metered_groups(client, reader, [updated, ended], batch_size=1)
    prefix = "{sw:legacy:" + uuid.uuid4().hex + "}"
    (event,) = record_events(updated)
    encoded = encode([event])
    (args,) = encoded.events
    sim, sid = event.data.sim_sid, str(event.data.data_session_sid)
    fleet, account, network, op, loc, imei = (
        encoded.texts[args[i] - 1] for i in (13, 14, 15, 16, 17, 18)
    )
    # What the previous layout held after the updated window (10:00-10:40, 600/60 bytes).
    for dimension, ident in (("s", sim), ("f", fleet), ("a", account), ("n", network)):
        reader.hset(f"{prefix}:m:h:{dimension}:{ident}:20240301", mapping={"10d": 600, "10u": 60})
        reader.hset(f"{prefix}:m:d:{dimension}:{ident}:202403", mapping={"01d": 600, "01u": 60})
    with_loc, with_imei = ("=" if loc else ""), ("=" if imei else "")
    only_there = "PI" + "7" * 32  # an ended session the new layout never sees
    reader.hset(
        legacy_sessions_key(prefix, sim, "20240301"),
        mapping={
            sid: f"{args[4]}||4800|=|{with_loc}|=|{with_imei}|=|0:2400|600|60|||||",
            only_there: f"{int(args[4]) - 3600}|600|1201|=|{with_loc}|=|{with_imei}|=|||"
            "|2024030109|5000|500|5000|500",
            "~": f"{fleet}^{account}^{op}|{loc}|{imei}",
        },
    )
    moved = await metered_groups(client, reader, [updated, ended, updated], 1, prefix)
    assert moved[0] == clean[0]
    assert moved[1][1] == clean[1][0]
    assert (moved[1][0]["sid"], moved[1][0]["data_total"], moved[1][0]["end"]) == (
        only_there,
        5500,
        "2024-03-01T09:10:00Z",
    )
    assert set(reader.hkeys(legacy_sessions_key(prefix, sim, "20240301"))) == {
        b"~",
        only_there.encode(),
    }


@pytest.mark.parametrize(
    ("case", "expected"),
    [("changed, then kept", b"HF" + b"1" * 32), ("deleted, then kept", b"HF" + b"1" * 32)],
)
async def test_records_sharing_a_slot_in_a_damaged_hash_end_as_the_last_write_left_them(
    client: redis.asyncio.Redis, reader: redis.Redis, case: str, expected: bytes
) -> None:
    """A component's own entry is not rewritten when it holds the value already, unless an
    earlier record of the call wrote or deleted it: in a hash whose records share a slot
    (a damaged ``~#``), the last record written decides the entry, as it always did."""
    sim, start = "HS" + "9" * 32, LIMIT_START
    sids = {n: "PI" + f"{n:032x}" for n in (1, 2, 3)}
    fleets = {n: "HF" + str(n) * 32 for n in (0, 1, 2, 9)}

    def window(session: int, n: int, fleet: int) -> ConnectionEvent:
        (event,) = record_events(
            make_record(
                "data-session.updated",
                seq=100 * session + n,
                schema_version=1,
                sim_sid=sim,
                data_session_sid=sids[session],
                timestamp=_iso(start + timedelta(seconds=n + 1)),
                data_session_start_time=_iso(start),
                data_session_update_start_time=_iso(start + timedelta(seconds=n)),
                data_session_update_end_time=_iso(start + timedelta(seconds=n + 1)),
                data_download=5,
                data_upload=0,
                data_total=5,
                fleet_sid=fleets[fleet],
            )
        )
        return event

    target = handler(client)
    for session, fleet in ((1, 0), (2, 1), (3, 2)):  # fleet 0 the default, then slots 1, 2
        await target.handle(Batch("s", [window(session, 0, fleet)]))
    key = sessions_key(PREFIX, sim, "20240301")
    field = b"\xff" + bytes.fromhex(sids[3][2:])
    record = reader.hget(key, field)
    assert record is not None
    parts = record.split(b"|")
    assert parts[9] == b"2"
    parts[9] = b"1"  # session 3 now shares session 2's slot, and the counter is gone
    reader.hset(key, field, b"|".join(parts))
    reader.hdel(key, "~#")
    assert reader.hget(key, "~f1") == fleets[1].encode()
    if case == "changed, then kept":  # 3 writes fleet 9 into slot 1, then 2 keeps fleet 1
        batch = [window(3, 1, 9), window(2, 1, 1)]
    else:  # 2 moves to the default (its entry deleted), then 3 keeps fleet 1 in slot 1
        batch = [window(2, 1, 0), window(3, 1, 1)]
    await target.handle(Batch("s", batch))
    assert reader.hget(key, "~f1") == expected


@pytest.mark.parametrize("layout", ["current", "previous"])
async def test_a_stored_record_it_cannot_read_fails_the_call_with_nothing_written(
    client: redis.asyncio.Redis, reader: redis.Redis, layout: str
) -> None:
    """A session record with more fields than this release knows (a newer layout's, or a
    damaged one), or a previous-layout record with a coverage bound that is not a whole
    number, fails the call before anything is written, instead of being misread."""
    (event,) = record_events(make_record("data-session.updated"))
    (args,) = encode([event]).events
    sim, sid = event.data.sim_sid, str(event.data.data_session_sid)
    assert event.data.data_session_start_time is not None
    day = event.data.data_session_start_time.strftime("%Y%m%d")
    if layout == "current":
        field = b"\xff" + bytes.fromhex(sid[2:])
        reader.hset(sessions_key(PREFIX, sim, day), field, "0" + "|" * 16)  # 17 fields
        reason = "more fields than this release knows"
    else:
        reader.hset(
            legacy_sessions_key(PREFIX, sim, day),
            mapping={sid: f"{args[4]}||4800|=||=||=|0:1.5|600|60|||||", "~": "a^b^c||"},
        )
        reason = "coverage bound that is not a whole number"
    before = snapshot(reader)
    with pytest.raises(redis.exceptions.ResponseError, match=reason):
        await handler(client).handle(Batch("s", [event]))
    assert snapshot(reader) == before


@pytest.mark.parametrize(
    "sid",
    ["session-1", "PI" + "A" * 32, "PI" + "0" * 31, "QS" + "0" * 32, "PI\u00ff" + "0" * 31],
    ids=["text", "upper-case", "short", "other-prefix", "non-ascii"],
)
async def test_sessions_with_other_sids_are_counted_once_and_listed_as_they_came(
    client: redis.asyncio.Redis, reader: redis.Redis, sid: str
) -> None:
    """Only standard sids (``PI`` and 32 lowercase hex digits) are stored as bytes; a
    session with any other sid is kept under its text, de-duplicated and listed the same."""
    clean = await metered_groups(
        client, reader, [group_window("updated"), group_window("ended")], batch_size=1
    )
    records = [group_window("updated", sid=sid), group_window("ended", sid=sid)]
    other = await metered_groups(client, reader, [*records, *records], batch_size=1)
    assert other[0] == clean[0]
    assert [item | {"sid": ""} for item in other[1]] == [item | {"sid": ""} for item in clean[1]]
    assert [item["sid"] for item in other[1]] == [sid]


async def test_a_coverage_with_many_gaps_is_kept_apart_and_folded_back(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Every other window first leaves a session's counted windows in six pieces: that
    list moves out of the record (which stays short, and the hash compact) and back in
    once the gaps are filled, and the hours stay exact throughout."""
    windows = [(10**9 + n, 10**6 + n) for n in range(12)]
    started, *updated, ended = record_events(*session_records(windows, 2))
    target = handler(client)
    key = sessions_key(PREFIX, SIM["sim_sid"], "20240301")
    await target.handle(Batch("s", [started, *updated[::2]]))
    assert any(field.startswith(b"~c") for field in reader.hkeys(key))
    assert reader.object("encoding", key) == b"listpack"
    await target.handle(Batch("s", [*updated[1::2], ended, *updated[::3]]))
    assert not any(field.startswith(b"~c") for field in reader.hkeys(key))
    assert reader.object("encoding", key) == b"listpack"
    last = SESSION_START + timedelta(minutes=20 * len(windows))
    days = SESSION_START.date(), last.date()
    rows = figures(reader, PREFIX, "sim", SIM["sim_sid"], *days, hourly=True)
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for n, (down, up) in enumerate(windows):
        pair = want[_hour(SESSION_START + timedelta(minutes=20 * (n + 1)))]
        pair[0] += down
        pair[1] += up
    assert {r.period[:13]: [r.down, r.up] for r in rows if r.down or r.up} == want


async def test_metering_hashes_stay_listpacks_under_redis_default_thresholds(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Under Redis' default ``hash-max-listpack-entries`` (512) and ``-value`` (64 bytes),
    every bucket and session hash of a messy simulated stream is a listpack, the compact
    encoding the layout is designed for, with room to spare: at most 128 fields, none
    longer than 64 bytes."""
    assert reader.config_get("hash-max-listpack-*") == {
        "hash-max-listpack-entries": "512",
        "hash-max-listpack-value": "64",
    }
    events, _ = simulated(**MESSY)
    await handle_all(handler(client), batches(events, random.Random(16)))
    keys = list(reader.scan_iter(match=PREFIX + ":m:*"))
    assert {reader.object("encoding", key) for key in keys} == {b"listpack"}
    stored = [reader.hgetall(key) for key in keys]
    assert max(len(fields) for fields in stored) <= 128
    assert max(len(text) for fields in stored for item in fields.items() for text in item) <= 64


# --- round trips, keys, retention ----------------------------------------------------------


async def test_one_redis_round_trip_per_batch(client: redis.asyncio.Redis) -> None:
    """Once the script is loaded, a batch costs one round trip; a batch without sessions none."""
    events, _ = simulated()
    parts = batches(events, random.Random(13))
    target = handler(client)
    await target.handle(parts[0])
    calls: list[str] = []
    original = client.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        calls.append(str(args[0]))
        return await original(*args, **options)

    client.execute_command = counting  # type: ignore[method-assign]
    await handle_all(target, parts[1:])
    attachments = [e for e in events if e.kind.value.startswith("attachment.")]
    await target.handle(Batch("s", attachments[:50]))
    assert calls == ["EVALSHA"] * (len(parts) - 1)


async def test_every_key_is_under_the_prefix_and_expires(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """All keys carry the prefix (one Cluster slot) and a TTL within their retention."""
    events, _ = simulated()
    await handle_all(
        handler(client, hour_retention_days=2, day_retention_days=9, session_retention_days=4),
        batches(events, random.Random(14)),
    )
    limits = {b":m:h:": 2 * DAY, b":m:d:": 9 * DAY, b":m:r:": 4 * DAY}
    seen = set()
    for key in reader.scan_iter():
        assert key.startswith(PREFIX.encode())
        kind = key[len(PREFIX) : len(PREFIX) + 5]
        seen.add(kind)
        assert limits[kind] - 60 < reader.ttl(key) <= limits[kind]
    assert seen == set(limits)


def test_day_retention_must_cover_session_retention() -> None:
    """Daily buckets may not expire before the sessions whose late windows move bytes in them."""
    with pytest.raises(ValidationError, match="day_retention_days"):
        MeteringSettings(day_retention_days=10, session_retention_days=30)


@pytest.mark.parametrize(
    ("stream_hours", "session_days", "warned"),
    [
        (24, 8, False),
        (168, 8, False),
        (169, 8, True),
        (24, 1, True),
        (24, 2, False),
        (None, 1, False),
    ],
)
async def test_start_warns_when_sessions_do_not_outlive_the_stream_by_a_day(
    client: redis.asyncio.Redis, stream_hours: int | None, session_days: int, warned: bool
) -> None:
    """Session records must outlive the stream's retention by a day (duplicates written
    late, consumer lag): the default covers Kinesis' 7-day extended retention; an unknown
    retention is not warned about."""
    target = handler(client, session_retention_days=session_days)
    with capture_logs() as logs:
        await target.start(StreamFacts(stream_name="s", retention_hours=stream_hours))
    found = [e for e in logs if e["event"] == "metering_session_retention_shorter_than_stream"]
    assert bool(found) is warned
    if warned:
        assert found[0]["needed_days"] == -(-(cast(int, stream_hours) + 24) // 24)
    assert MeteringSettings().session_retention_days == 8


async def test_start_records_its_layout_and_refuses_a_newer_one(
    client: redis.asyncio.Redis,
) -> None:
    """A release records the layout it writes; one finding data of a newer layout refuses
    to start (it would misread it and count events again) and says what to run."""
    target = handler(client)
    facts = StreamFacts(stream_name="s", retention_hours=24)
    await target.start(facts)
    layout_key = f"{PREFIX}:m:layout"
    assert int(await client.get(layout_key)) == LAYOUT
    await client.set(layout_key, LAYOUT + 1)
    with pytest.raises(
        ConfigError, match=r"newer release \(layout 3; this release reads up to 2\)"
    ):
        await target.start(facts)
    assert int(await client.get(layout_key)) == LAYOUT + 1, "left as the newer release wrote it"


async def test_factory_reads_settings_metering_or_uses_defaults(
    client: redis.asyncio.Redis,
) -> None:
    """The plugin reads ``SUPERSIM_METERING__*`` (defaults without variables); ``create``
    takes the section it is handed."""
    (plain,) = registry.build(["metering"], client, PREFIX)
    assert isinstance(plain, MeteringHandler)
    assert plain.settings == MeteringSettings()
    custom = MeteringSettings(hour_retention_days=3)
    assert create(HandlerContext(custom, client, PREFIX)).settings is custom
    (given,) = registry.build(["metering"], client, PREFIX, sections={"metering": custom})
    assert isinstance(given, MeteringHandler)
    assert given.settings is custom


async def test_logs_carry_no_personal_data(client: redis.asyncio.Redis) -> None:
    """Handling and closing log counts only, never IMSI, IMEI, ICCID, IP or location."""
    events, _ = simulated()
    target = handler(client)
    with capture_logs() as logs:
        await handle_all(target, batches(events[:2000], random.Random(15)))
        await target.close()
    text = orjson.dumps(logs).decode()
    assert logs
    for event in events[:2000]:
        data = event.data
        for value in (data.imsi, data.imei, data.sim_iccid, data.ip_address):
            assert not value or value not in text


async def test_buckets_hold_hours_of_a_day_and_days_of_a_month(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """An hourly bucket is field ``H``/``H + 100`` of the day's hash (the documented layout)."""
    (event,) = record_events(make_record("data-session.ended"))
    await handler(client).handle(Batch("s", [event]))
    stored = reader.hgetall(hourly_key(PREFIX, "sim", event.data.sim_sid, "20221214"))
    cumulative = event.data.data_session_data_download, event.data.data_session_data_upload
    assert stored == {b"13": str(cumulative[0]).encode(), b"113": str(cumulative[1]).encode()}


# --- limits of exact counting --------------------------------------------------------------

MAX_COUNT = 2**53 - 1
LIMIT_START = datetime(2024, 3, 1, 10, 0)


def big_window(sim: str, session: str, n: int, down: int, seq: int, **fields: Any) -> bytes:
    """A v1 updated event of session ``session`` whose n-th one-second window holds ``down``."""
    begin, end = LIMIT_START + timedelta(seconds=n), LIMIT_START + timedelta(seconds=n + 1)
    return make_record(
        "data-session.updated",
        seq=seq,
        schema_version=1,
        sim_sid=sim,
        data_session_sid=session,
        timestamp=_iso(end),
        data_session_start_time=_iso(LIMIT_START),
        data_session_update_start_time=_iso(begin),
        data_session_update_end_time=_iso(end),
        data_download=down,
        data_upload=0,
        data_total=down,
        **fields,
    )


async def test_a_sum_beyond_exact_range_is_refused_with_nothing_written(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Two windows of one session summing past 2**53 - 1 cannot be counted exactly as
    doubles: the call fails before writing anything; the first alone is counted exactly and
    the second is then refused by the session's running total."""
    sim, session = "HS" + "1" * 32, "PI" + "1" * 32
    first, second = record_events(
        big_window(sim, session, 0, MAX_COUNT, 1), big_window(sim, session, 1, 1, 2)
    )
    target = handler(client)
    with pytest.raises(redis.exceptions.ResponseError, match="beyond 2\\^53"):
        await target.handle(Batch("s", [first, second]))
    assert list(reader.scan_iter()) == []
    await target.handle(Batch("s", [first]))
    with pytest.raises(redis.exceptions.ResponseError, match="session download"):
        await target.handle(Batch("s", [second]))
    day = LIMIT_START.date()
    assert figures(reader, PREFIX, "sim", sim, day, day)[0].down == MAX_COUNT


async def test_a_bucket_total_redis_refuses_undoes_the_whole_call(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """HINCRBY refuses a total beyond 2**63 - 1 part-way through the writes: the writes made
    before it are undone, so a retried batch never counts its other windows twice, and no
    bucket's TTL restarts (one that gained a field before the refusal keeps its own)."""
    sim = "HS" + "3" * 32
    # 1024 sessions of 2**53 - 1 bytes in one SIM-hour: its buckets reach 2**63 - 1024.
    target = handler(client)
    for n in range(1024):
        await target.handle(
            Batch("s", record_events(big_window(sim, f"PI{n:032d}", 0, MAX_COUNT, n)))
        )
    # Another SIM in another fleet, account and network: its SIM buckets are written before
    # the overflowing one (the fleet, account and network ones after it, so never).
    other = "HS" + "4" * 32
    apart = {"fleet_sid": "HF" + "4" * 32, "account_sid": "AC" + "4" * 32, "network": None}
    # It has counted an hour before: its buckets exist, and gain the next hour first.
    await target.handle(
        Batch("s", record_events(big_window(other, "PI" + "7" * 32, 0, 10, 4999, **apart)))
    )
    others = [key for key in reader.scan_iter(f"{PREFIX}:m:[hd]:*") if b"4444" in key]
    assert len(others) == 6  # hourly and daily, of the SIM, its fleet and its account
    for key in others:
        reader.expire(key, 100)
    small, overflowing = record_events(
        big_window(other, "PI" + "5" * 32, 3600, 1000, 5000, **apart),
        big_window(sim, "PI" + "6" * 32, 0, 2000, 5001),
    )
    before = snapshot(reader)
    gained = hourly_key(PREFIX, "sim", other, "20240301").encode()
    assert gained in others  # it gains the hour 11 field before the refusal
    for _ in range(3):
        with pytest.raises(redis.exceptions.ResponseError, match="nothing counted"):
            await target.handle(Batch("s", [small, overflowing]))
        assert snapshot(reader) == before
        assert all(0 < reader.ttl(key) <= 100 for key in others)
    await target.handle(Batch("s", [small]))
    day = LIMIT_START.date()
    assert figures(reader, PREFIX, "sim", other, day, day)[0].down == 1010
    # The hourly hashes gained the hour: their TTLs restart; the daily ones did not.
    assert all((reader.ttl(key) > 100) == (b":m:h:" in key) for key in others)


async def test_a_session_event_without_its_start_is_refused_not_filed_apart(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """Decode refuses these; one built in code makes the handler raise (so the consumer
    dead-letters it) instead of counting its window again under another session record."""
    (event,) = record_events(make_record("data-session.updated"))
    data = event.data.model_copy(update={"data_session_start_time": None})
    startless = dataclasses.replace(
        event, envelope=event.envelope.model_copy(update={"data": data})
    )
    with pytest.raises(ValueError, match=r"lacks data\.data_session_start_time"):
        await handler(client).handle(Batch("s", [event, startless]))
    assert list(reader.scan_iter()) == []


@pytest.mark.parametrize("sid", ["~", "~l1"])
async def test_a_session_named_like_the_records_shared_fields_is_refused(
    client: redis.asyncio.Redis, reader: redis.Redis, sid: str
) -> None:
    """Fields starting with ``~`` hold a session hash's shared values: an event whose
    session sid starts so is refused (and so dead-lettered by the consumer), not skipped
    in silence."""
    (event,) = record_events(make_record("data-session.updated", data_session_sid=sid))
    with pytest.raises(ValueError, match="is not a session id"):
        await handler(client).handle(Batch("s", [event]))
    assert list(reader.scan_iter()) == []


async def test_redis_refusing_writes_is_passed_on_as_an_outage(
    client: redis.asyncio.Redis, reader: redis.Redis
) -> None:
    """A full Redis (noeviction) refuses the script's writes with its own error, which the
    consumer treats as an outage (retry), not as bad records (dead-letter)."""
    (event,) = record_events(make_record("data-session.updated"))
    reader.config_set("maxmemory-policy", "noeviction")
    reader.config_set("maxmemory", "1")
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError) as refused:
            await handler(client).handle(Batch("s", [event]))
    finally:
        reader.config_set("maxmemory", "0")
    assert is_infrastructure_failure(refused.value)
    await handler(client).handle(Batch("s", [event]))


def test_encoding_keeps_only_short_texts_and_a_bounded_number() -> None:
    """The per-handler text caches hold neither long fields nor an unbounded number."""
    from worker.events.records import Location, Network
    from worker.handlers.metering.handler import _TEXT_CACHE_MAX, _Texts

    texts = _Texts()
    long_name = "x" * 100_000
    _, group = texts.group(Network(mcc="310", mnc="260", friendly_name=long_name), "4G")
    assert long_name in group
    assert not texts.groups
    assert texts.place(Location(cell_id=long_name, lat=1.5, lon=2.5)).startswith(long_name)
    assert not texts.places
    for n in range(_TEXT_CACHE_MAX + 5):
        texts.group(Network(mcc=str(n), mnc="1"), None)
        texts.place(Location(cell_id=str(n), lat=1.5, lon=2.5))
    assert len(texts.groups) <= _TEXT_CACHE_MAX
    assert len(texts.places) <= _TEXT_CACHE_MAX
    assert texts.group(Network(mcc="7", mnc="1"), None) == (
        "-7-1",
        "-7-1^^7^1^^",
    )
