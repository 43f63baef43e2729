"""``worker.testing``, the handler authors' kit: builders, the runner, ``assert_idempotent``,
Redis snapshots and the pytest fixtures (loaded by the ``pytest11`` entry point)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel
from redis.asyncio import Redis

from worker.errors import ConfigError
from worker.events.records import ConnectionEvent, EventKind, Vendor
from worker.handlers.alerts.settings import AlertSettings
from worker.handlers.base import Batch, Gauge, HandlerContext, Plugin, StreamFacts
from worker.handlers.metering.settings import MeteringSettings
from worker.testing import (
    KINDS,
    VENDORS,
    HandlerRunner,
    SimulatedFleet,
    assert_idempotent,
    in_other_envelope,
    make_connection_event,
    make_event,
    snapshot,
    twin,
)
from worker.testing.events import make_other_event, make_sink_test_event
from worker.testing.runner import shard_of
from worker.testing.samples import SAMPLE_EVENT_SID
from worker.testing.state import delete, diff

PREFIX = "{sw:kit:test}"

# --- builders --------------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_builds_in_both_envelopes(kind: str, vendor: str) -> None:
    """Each kind decodes as itself from each vendor, and its twin is the other vendor's."""
    event = make_connection_event(kind, vendor)
    assert (event.kind, event.vendor) == (EventKind(kind), Vendor(vendor))
    other = twin(event)
    assert other.vendor is (Vendor.KORE if vendor == "twilio" else Vendor.TWILIO)
    assert (other.kind, other.event_sid, other.data) == (event.kind, event.event_sid, event.data)
    assert in_other_envelope(in_other_envelope(make_event(kind, vendor))) == make_event(
        kind, vendor
    )


def test_shorthands_set_the_fields_tests_vary() -> None:
    """sim, fleet, session, at, bytes and error code land where the real format has them."""
    ended = make_connection_event(
        "data-session.ended",
        "kore",
        sim="HS1",
        fleet="HF1",
        session="PI1",
        at="2024-03-01T00:03:00+00:00",
        download=700,
        upload=300,
    )
    data = ended.data
    at = datetime(2024, 3, 1, 0, 3, tzinfo=UTC)
    assert (data.sim_sid, data.fleet_sid, data.data_session_sid) == ("HS1", "HF1", "PI1")
    assert data.timestamp == ended.envelope.time == data.data_session_end_time == at
    assert (
        data.data_session_start_time == data.data_session_update_start_time == at.replace(minute=0)
    )
    assert data.data_session_update_end_time == at
    assert (data.data_download, data.data_upload, data.data_total) == (700, 300, 1000)
    assert data.data_session_data_total == 1000
    rejected = make_connection_event("attachment.rejected", error_code=83702)
    assert rejected.data.error is not None
    assert (rejected.data.error.code, rejected.data.error.message) == (
        83702,
        "DIAMETER_ERROR_ROAMING_NOT_ALLOWED",
    )
    with pytest.raises(ValueError, match="reports no bytes"):
        make_event("attachment.accepted", download=1)


def test_an_events_sid_follows_its_identity_not_its_vendor() -> None:
    """Same arguments, same event (in either envelope); another SIM or time, another event."""
    assert make_event()["id"] == SAMPLE_EVENT_SID
    one = make_event("attachment.accepted", sim="HS1", at="2024-03-01T10:00:00Z")
    assert (
        make_event("attachment.accepted", "kore", sim="HS1", at="2024-03-01T10:00:00Z")["id"]
        == one["id"]
    )
    assert (
        make_event("attachment.accepted", sim="HS2", at="2024-03-01T10:00:00Z")["id"] != one["id"]
    )
    assert (
        make_event("attachment.accepted", sim="HS1", at="2024-03-01T10:00:01Z")["id"] != one["id"]
    )


# --- the runner ------------------------------------------------------------------------------


class Recorder:
    """A handler that records the calls it gets, and flags two batches of a shard at once."""

    name = "recorder"

    def __init__(self, context: HandlerContext[None]) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.busy: set[str] = set()
        self.overlapped = False
        self.prefix = context.key_prefix

    async def start(self, stream: StreamFacts) -> None:
        self.calls.append(("start", stream.stream_name))

    async def on_shards_assigned(self, shards: Sequence[str]) -> None:
        self.calls.append(("assigned", *shards))

    async def on_shards_revoked(self, shards: Sequence[str], *, ended: bool) -> None:
        self.calls.append(("revoked", *shards, ended))

    async def handle(self, batch: Batch) -> None:
        self.overlapped |= batch.shard_id in self.busy
        self.busy.add(batch.shard_id)
        await asyncio.sleep(0.001)
        self.busy.discard(batch.shard_id)
        self.calls.append(("handle", batch.shard_id, [e.meta for e in batch.events]))

    async def tick(self) -> None:
        self.calls.append(("tick",))

    async def gauges(self) -> list[Gauge]:
        return [Gauge("seen", float(len(self.calls)))]

    async def close(self) -> None:
        self.calls.append(("close",))


async def test_the_runner_calls_the_hooks_as_the_consumer_does(redis_url: str) -> None:
    """start, then assigned before a shard's first batch; tick and gauges on demand; on
    exit revoked (after the last batch), then close. Non-connection events are skipped."""
    runner = HandlerRunner(Plugin(Recorder), redis_url)
    async with runner as run:
        records = [
            make_connection_event("attachment.accepted", seq=1),
            orjson.dumps(make_sink_test_event()),
            make_other_event(),
            make_event("attachment.rejected", "kore", seq=2),
        ]
        batch = await run.feed(records, shard_id="shardId-000000000001")
        await run.feed(
            [make_connection_event("attachment.failed")], shard_id="shardId-000000000001"
        )
        assert await run.tick()
        assert [gauge.name for gauge in await run.gauges()] == ["seen"]
        handler = run.handler
        assert isinstance(handler, Recorder)
    assert [e.kind.value for e in batch.events] == ["attachment.accepted", "attachment.rejected"]
    assert [e.meta.sequence_number for e in batch.events if e.meta] == [f"{1:056d}", f"{2:056d}"]
    assert [call[0] for call in handler.calls] == [
        "start",
        "assigned",
        "handle",
        "handle",
        "tick",
        "revoked",
        "close",
    ]
    assert handler.calls[-2] == ("revoked", "shardId-000000000001", False)


class Unfinished(Recorder):
    """A ``Recorder`` whose ``flush`` says it left something undone."""

    async def flush(self) -> str | None:
        return "2 reports not sent"


async def test_the_runners_flush_returns_what_the_handler_says_it_left(redis_url: str) -> None:
    """``flush()`` gives what the handler's flush said (the run's exit 3 and its
    ``last_tick_incomplete`` line come from it); None for a handler without one."""
    async with HandlerRunner(Plugin(Unfinished), redis_url) as run:
        assert await run.flush() == "2 reports not sent"
    async with HandlerRunner(Plugin(Recorder), redis_url) as run:
        assert await run.flush() is None


async def test_feed_stream_spreads_sims_over_shards_never_two_batches_of_one_at_once(
    redis_url: str, supersim_fleet: SimulatedFleet
) -> None:
    """Each SIM stays on its shard; a shard's batches come in order, one at a time."""
    async with HandlerRunner(Plugin(Recorder), redis_url) as run:
        batches = await run.feed_stream(supersim_fleet.records, shards=3, batch_size=40)
        handler = run.handler
        assert isinstance(handler, Recorder)
    assert {batch.shard_id for batch in batches} == {f"shardId-{i:012d}" for i in range(3)}
    for batch in batches:
        assert {shard_of(e.data.sim_sid, 3) for e in batch.events} == {int(batch.shard_id[-1])}
    assert not handler.overlapped
    assert sum(len(batch) for batch in batches) == len(supersim_fleet.events())
    for shard in {batch.shard_id for batch in batches}:
        handled = [c[2] for c in handler.calls if c[0] == "handle" and c[1] == shard]
        numbers = [meta.sequence_number for metas in handled for meta in metas]
        assert numbers == sorted(numbers)


async def test_settings_are_read_from_the_environment_or_given(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By name, the section comes from SUPERSIM_<SECTION>__*; given settings win; a wrong
    model or a plugin without a section to read from are refused."""
    monkeypatch.setenv("SUPERSIM_METERING__HOUR_RETENTION_DAYS", "5")
    assert HandlerRunner("metering", redis_url).settings.hour_retention_days == 5
    given = MeteringSettings(hour_retention_days=9)
    assert HandlerRunner("metering", redis_url, settings=given).settings is given
    monkeypatch.setenv("SUPERSIM_METERING__HOUR_RETENTION_DAYS", "0")
    with pytest.raises(ConfigError, match="SUPERSIM_METERING__HOUR_RETENTION_DAYS"):
        HandlerRunner("metering", redis_url)

    class Other(BaseModel):
        pass

    with pytest.raises(TypeError, match="must be a MeteringSettings"):
        HandlerRunner("metering", redis_url, settings=Other())
    with pytest.raises(TypeError, match="name="):
        HandlerRunner(Plugin(Counting, settings=Other), redis_url)


# --- assert_idempotent -----------------------------------------------------------------------


class Counting:
    """Not idempotent: counts deliveries, not distinct events."""

    name = "counting"

    def __init__(self, context: HandlerContext[Any]) -> None:
        self.redis, self.prefix = context.redis, context.key_prefix

    async def handle(self, batch: Batch) -> None:
        for event in batch.events:
            await self.redis.hincrby(f"{self.prefix}:n", event.kind.value, 1)  # type: ignore[misc]

    async def close(self) -> None:
        pass


class Elsewhere(Counting):
    """Writes outside its key prefix."""

    async def handle(self, batch: Batch) -> None:
        await self.redis.set("not-under-the-prefix", len(batch))


def events() -> list[ConnectionEvent]:
    return [make_connection_event(kind, seq=seq) for kind in KINDS for seq in range(2)]


async def test_assert_idempotent_passes_metering_on_a_simulated_fleet(
    supersim_redis_url: str, supersim_fleet: SimulatedFleet
) -> None:
    """The built-in metering handler passes (the pytest plugin's fixtures supply the rest)."""
    state = await assert_idempotent(
        "metering", supersim_redis_url, supersim_fleet.records, settings=MeteringSettings()
    )
    assert any(key.startswith(":m:h:f:") for key in state)


@pytest.mark.parametrize("rule", ["rejections", "data_limit", "attach_loops"])
async def test_assert_idempotent_passes_the_alert_rules_but_their_clock_keys(
    rule: str, redis_url: str, supersim_simulate: Callable[..., SimulatedFleet]
) -> None:
    """The built-in alert rules on a fleet with an outage: only the wall-clock bookkeeping
    (``seen``, ``since``, and ``logt``: when the clear logs expire) differs, and ``ignore``
    leaves it out."""
    fleet = supersim_simulate(sims=100, fleets=2, hours=1, outage=True)
    settings = AlertSettings(sinks="log,stream", stale_after=None)
    state = await assert_idempotent(
        rule,
        redis_url,
        fleet.records,
        settings=settings,
        ignore=[":alerts:*:seen", ":alerts:*:since", ":alerts:*:logt"],
    )
    assert any(key.startswith(f":alerts:{rule}:") for key in state)


async def test_assert_idempotent_shows_what_a_counting_handler_got_wrong(redis_url: str) -> None:
    """The error names the key and each field's value after one feed and after two."""
    with pytest.raises(AssertionError) as caught:
        await assert_idempotent(Plugin(Counting), redis_url, events(), key_prefix=PREFIX)
    message = str(caught.value)
    assert "not idempotent" in message
    assert "  :n (hash):" in message
    assert "field 'attachment.accepted': '2' once, '6' twice" in message


async def test_assert_idempotent_refuses_a_handler_that_wrote_nothing_under_its_prefix(
    redis_url: str,
) -> None:
    """Writing nowhere (or outside the prefix) would prove nothing: that fails too."""
    with pytest.raises(AssertionError, match="wrote nothing under"):
        await assert_idempotent(Plugin(Elsewhere), redis_url, events())


# --- snapshots -------------------------------------------------------------------------------


async def test_a_snapshot_reads_every_type_and_the_diff_names_the_changes(
    redis: Redis,
) -> None:
    """Strings, hashes, sets, sorted sets, lists and streams, with expiry; nothing else."""
    await redis.set(f"{PREFIX}:s", "1", ex=100)
    await redis.hset(f"{PREFIX}:h", mapping={"a": "1", "b": "2"})  # type: ignore[misc]
    await redis.sadd(f"{PREFIX}:set", "x", "y")  # type: ignore[misc]
    await redis.zadd(f"{PREFIX}:z", {"m": 2.0})
    await redis.rpush(f"{PREFIX}:l", "p", "q")  # type: ignore[misc]
    await redis.xadd(f"{PREFIX}:x", {"f": "v"})
    await redis.set("{sw:other:test}:s", "1")
    before = await snapshot(redis, PREFIX)
    assert {key: (state.type, state.value, state.expires) for key, state in before.items()} == {
        ":h": ("hash", {"a": "1", "b": "2"}, False),
        ":l": ("list", ["p", "q"], False),
        ":s": ("string", "1", True),
        ":set": ("set", ["x", "y"], False),
        ":x": ("stream", [{"f": "v"}], False),
        ":z": ("zset", [("m", 2.0)], False),
    }
    await redis.hset(f"{PREFIX}:h", "b", "3")  # type: ignore[misc]
    await redis.sadd(f"{PREFIX}:set", "z")  # type: ignore[misc]
    await redis.persist(f"{PREFIX}:s")
    await redis.delete(f"{PREFIX}:l")
    changes = diff(before, await snapshot(redis, PREFIX), "before", "after")
    assert changes.splitlines() == [
        "  :h (hash):",
        "      field 'b': '2' before, '3' after",
        "  :l (list): only before",
        "  :s: string, expires before, string after",
        "  :set (set):",
        "      only after: 'z'",
    ]
    assert await delete(redis, PREFIX) == 5
    assert await snapshot(redis, PREFIX) == {}
