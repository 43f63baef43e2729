"""Backfills: old episodes are recorded but not sent as new alerts; recent ones are sent."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alerts_support import (
    FLEET_A,
    NOISY,
    PREFIX,
    SIM_A,
    SIM_B,
    Clock,
    Receiver,
    at,
    close_all,
    event,
    feed,
    finish,
    handler,
    iso,
    parse,
    settings,
    sim_end,
    simulated,
    stream_alerts,
    webhook_settings,
)
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker.handlers.alerts import handler as alert_handler
from worker.handlers.alerts.model import to_ms
from worker.handlers.alerts.settings import ThresholdOverrides
from worker.handlers.base import Batch

NAMES = ("rejections", "data_limit", "attach_loops")


async def test_backfill_of_last_week_records_episodes_but_sends_none(
    redis: Redis, receiver: Receiver
) -> None:
    """A backfill a week later sends no alert anywhere but records (and logs) every episode."""
    events, truth = simulated(**NOISY)
    end = sim_end(NOISY)
    tuned = webhook_settings(receiver.url).model_copy(update={"stale_after": timedelta(hours=1)})
    handlers = [handler(name, redis, Clock(end + timedelta(days=7)), tuned) for name in NAMES]
    with capture_logs() as logs:
        await feed(handlers, events, batch_size=500)
        await finish(handlers, end + timedelta(hours=1))
    assert await stream_alerts(redis) == []
    assert receiver.requests == 0
    recorded = {
        line["alert_id"]
        for line in logs
        if line["event"] == "alert_recorded_not_sent" and line["status"] == "open"
    }
    episodes = sum(
        len(truth[key])
        for key in (
            "rejection_storms",
            "fleet_rejection_episodes",
            "failure_bursts",
            "data_limit_episodes",
            "attach_loops",
        )
    )
    assert len(recorded) == episodes
    assert not [line for line in logs if line["event"] == "alert_opened"]
    await close_all(handlers)


async def test_backfill_reaching_the_present_sends_only_episodes_still_recent(
    redis: Redis,
) -> None:
    """A backfill up to now sends exactly the episodes with events in the last hour or still going."""
    events, _ = simulated(**NOISY)
    end = sim_end(NOISY)
    clock = Clock(end + timedelta(minutes=10))
    reference = [handler(name, redis, clock) for name in NAMES]
    await feed(reference, events, batch_size=500)
    await finish(reference, end + timedelta(hours=1))
    everything = await stream_alerts(redis)
    await close_all(reference)
    await redis.flushdb()

    limited = settings(stale_after=timedelta(hours=1))
    handlers = [handler(name, redis, clock, limited) for name in NAMES]
    await feed(handlers, events, batch_size=500)
    await finish(handlers, end + timedelta(hours=1))
    sent = await stream_alerts(redis)
    cutoff = end + timedelta(minutes=10) - timedelta(hours=1)
    final = {a["id"]: a for a in everything}  # the last alert of each episode wins
    ongoing = {i for i, a in final.items() if a["status"] == "open"}  # still open at the end
    recent = {i for i, a in final.items() if parse(a["last_seen"]) >= cutoff} | ongoing
    assert recent
    assert len(recent) < len(final)
    assert {a["id"] for a in sent} == recent
    assert {a["id"] for a in sent if a["status"] == "open"} == recent
    await close_all(handlers)


async def test_old_episode_still_going_is_announced_once_it_is_recent(redis: Redis) -> None:
    """A storm that began before the limit and goes on is sent once, with its whole history."""
    clock = Clock(at(7200 + 30))
    handlers = [handler("rejections", redis, clock, settings(stale_after=timedelta(hours=1)))]
    storm = [event("attachment.rejected", i, i * 20) for i in range(361)]  # 0 s .. 7200 s
    with capture_logs() as logs:
        await feed(handlers, storm[:50])
        clock.advance(30)  # past the shard warm-up: the batches alone move event time on
        await feed(handlers, storm[50:], batch_size=50)
        await finish(handlers, at(7200 + 400))
    opened, resolved = await stream_alerts(redis)
    assert (opened["status"], resolved["status"]) == ("open", "resolved")
    assert opened["first_seen"] == iso(at(0))
    assert opened["opened_at"] == iso(at(180))
    assert parse(opened["last_seen"]) >= at(60 + 3600)
    assert resolved["count"] == 361
    assert [line["status"] for line in logs if line["event"] == "alert_recorded_not_sent"] == [
        "open"
    ]
    await close_all(handlers)


async def test_a_redriven_dead_letter_holds_back_no_shards_event_time(redis: Redis) -> None:
    """A dead letter redriven long after it failed is a late event (a batch without a
    shard): it counts in its episode but is not taken for a shard's progress, which would
    hold back closing every quiet episode for as long as that shard counts as active."""
    clock = Clock(at(600))
    (rejections,) = [handler("rejections", redis, clock)]
    live = [event("attachment.rejected", n, 300 + n, error={"code": 20006}) for n in range(3)]
    await feed([rejections], live, shard="shardId-000000000001")
    late = event("attachment.rejected", 99, 10, error={"code": 20006})
    await rejections.handle(Batch("", [late]))
    shards: set[bytes] = set()
    async for key in redis.scan_iter(match="*:seen"):
        shards |= set(await redis.hkeys(key))
    assert shards == {b"shardId-000000000001"}
    await close_all([rejections])


async def test_one_tick_walks_and_closes_more_subjects_than_one_script_call_takes(
    redis: Redis,
) -> None:
    """A script call walks at most 1,000 subjects and closes at most 1,000 episodes; a tick
    calls again while more are due, so a backfill Job's last tick leaves none behind."""
    sims = [f"HS{index:032x}" for index in range(1_100)]
    events = [
        event("attachment.rejected", index, 10 + index % 50, sim=sim)
        for index, sim in enumerate(sims)
    ]
    # Each rejection opens an episode; a warm-up longer than the test walks nothing before
    # the tick.
    tuned = settings(
        shard_warmup=timedelta(hours=1),
        fleets={FLEET_A: ThresholdOverrides(storm_rejections=1)},
    )
    clock = Clock(at(3600))
    rejections = handler("rejections", redis, clock, tuned)
    try:
        await feed([rejections], events, batch_size=len(events))
        assert await redis.zcard(f"{PREFIX}:alerts:rejections:pend") == len(sims)
        assert not rejections.transitions
        await rejections.tick(at(3000))
        assert rejections.transitions[("rejection_storm", "open")] == len(sims)
        assert rejections.transitions[("rejection_storm", "resolved")] == len(sims)
        assert await redis.zcard(f"{PREFIX}:alerts:rejections:pend") == 0
        assert await redis.zcard(f"{PREFIX}:alerts:rejections:open") == 0
        assert await rejections.flush() is None  # nothing left: the run may exit 0
    finally:
        await close_all([rejections])


async def test_a_tick_stopped_at_its_call_limit_says_so_at_the_flush(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick that took its limit of script calls with subjects still due tells so at the
    flush (a run that ends caught up then exits 3), until a tick gets through them."""
    monkeypatch.setattr(alert_handler, "TICK_CALLS", 1)
    sims = [f"HS{index:032x}" for index in range(1_100)]
    events = [event("attachment.rejected", index, 10, sim=sim) for index, sim in enumerate(sims)]
    tuned = settings(
        shard_warmup=timedelta(hours=1),
        fleets={FLEET_A: ThresholdOverrides(storm_rejections=1)},
    )
    rejections = handler("rejections", redis, Clock(at(3600)), tuned)
    try:
        await feed([rejections], events, batch_size=len(events))
        await rejections.tick(at(3000))
        assert await redis.zcard(f"{PREFIX}:alerts:rejections:pend") == 100
        left = await rejections.flush()
        assert left is not None
        assert left.startswith("the last tick stopped at its 1 script calls"), left
        await rejections.tick(at(3000))
        assert await redis.zcard(f"{PREFIX}:alerts:rejections:pend") == 0
        assert await rejections.flush() is None
    finally:
        await close_all([rejections])


async def test_an_open_episode_whose_window_grew_is_indexed_at_its_new_end_by_a_tick(
    redis: Redis,
) -> None:
    """An episode indexed to end when quiet at ``last + window`` whose rule's window then grew
    (new settings) is, when event time passes its old end, indexed at its new end: it leaves
    the due range, so a tick (which calls again while a call took its limit of due
    subjects) never takes it again for nothing."""
    clock = Clock(at(10_000))
    overrides = {"storm_rejections": 1, "storm_window": timedelta(seconds=300)}
    short = settings(shard_warmup=timedelta(0), fleets={FLEET_A: ThresholdOverrides(**overrides)})
    first = handler("rejections", redis, clock, short)
    try:
        await first.handle(Batch("s0", [event("attachment.rejected", 1, 0)]))
        await first.handle(Batch("s0", [event("attachment.rejected", 2, 200, sim=SIM_B)]))
        assert first.transitions[("rejection_storm", "open")] == 1  # SIM_A, walked
    finally:
        await close_all([first])
    longer = short.model_copy(
        update={"fleets": {FLEET_A: ThresholdOverrides(**{**overrides, "storm_window": 900})}}
    )
    second = handler("rejections", redis, clock, longer)
    try:
        # A hit on another shard, later than shard s0's progress: stored, not walked; the
        # subject takes the rule's new window.
        await second.handle(Batch("s1", [event("attachment.rejected", 3, 2000)]))
        member = f"rejection_storm\tsim:{SIM_A}"
        assert await redis.zscore(f"{PREFIX}:alerts:rejections:open", member) == to_ms(at(300))
        await second.tick(at(660))  # event time 600 s: past the old end, before the new one
        assert await redis.zscore(f"{PREFIX}:alerts:rejections:open", member) == to_ms(at(900))
    finally:
        await close_all([second])
