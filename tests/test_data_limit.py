"""The ``data_limit`` handler against a real redis: blocked SIMs, unblocking, the gauge."""

from __future__ import annotations

from datetime import timedelta

from alerts_support import (
    FLEET_A,
    FLEET_B,
    NOISY,
    SIM_A,
    SIM_B,
    Clock,
    at,
    close_all,
    event,
    feed,
    finish,
    handler,
    iso,
    match,
    sim_end,
    sim_subject,
    simulated,
    stream_alerts,
)
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.rules.data_limit import DataLimitHandler

DAY_AND_A_HALF = {**NOISY, "sims": 60, "hours": 36, "outage": False, "failure_bursts": False}


async def test_one_alert_per_blocked_episode_and_exact_unblocking(redis: Redis) -> None:
    """Every data-limit episode alerts once at its first blocked event and resolves at its unblocking."""
    events, truth = simulated(**DAY_AND_A_HALF)
    end = sim_end(DAY_AND_A_HALF)
    handlers = [handler("data_limit", redis, Clock(end))]
    await feed(handlers, events, batch_size=400)
    await finish(handlers, end + timedelta(hours=1))
    alerts = await stream_alerts(redis)
    episodes = truth["data_limit_episodes"]
    assert any(e["unblocked_at"] for e in episodes)
    matched = match(alerts, "data_limit_reached", episodes, sim_subject)
    assert matched.not_exactly_once == []
    assert matched.extra == []
    resolved = {a["id"]: a for a in alerts if a["status"] == "resolved"}
    for episode, (alert,) in matched.found:
        assert alert["first_seen"] == episode["blocked_at"]
        if episode["unblocked_at"] is None:
            assert alert["id"] not in resolved
        else:
            assert resolved[alert["id"]]["resolved_at"] == episode["unblocked_at"]


def blocked(seq: int, seconds: float, **kw: str) -> ConnectionEvent:
    return event("data-session.updated", seq, seconds, data_modifier="blocked", **kw)


async def test_later_blocked_events_do_nothing_and_unblocked_resolves(redis: Redis) -> None:
    """The first blocked event alerts with the usage so far; more do nothing; an unblocked one resolves."""
    handlers = [handler("data_limit", redis, Clock(at(3600)))]
    normal = event("data-session.updated", 1, 0)
    usage = event("data-session.ended", 2, 360, data_modifier="blocked")
    await feed(handlers, [normal, usage, blocked(3, 720), blocked(4, 1080)])
    await finish(handlers, at(1100))
    (opened,) = await stream_alerts(redis)
    assert (opened["kind"], opened["sim_sid"], opened["fleet_sid"]) == (
        "data_limit_reached",
        SIM_A,
        FLEET_A,
    )
    assert opened["first_seen"] == iso(at(360))
    assert opened["details"]["usage_at_block"]["session_total"] == 5_631_339
    assert "5631339 bytes" in opened["summary"]
    await feed(handlers, [event("attachment.accepted", 5, 1500), blocked(6, 1200)])
    await finish(handlers, at(1600))
    opened, resolved = await stream_alerts(redis)
    assert (resolved["id"], resolved["status"]) == (opened["id"], "resolved")
    assert resolved["resolved_at"] == iso(at(1500))
    assert resolved["resolution"] == "unblocked"
    assert resolved["count"] == 4


async def test_unblocked_event_arriving_first_still_orders_by_event_time(redis: Redis) -> None:
    """An unblocked event arriving before earlier blocked ones still resolves at its own event time."""
    handlers = [handler("data_limit", redis, Clock(at(3600)))]
    await feed(handlers, [event("data-session.updated", 9, 500)], batch_size=1)
    await feed(handlers, [blocked(1, 100), blocked(2, 200), blocked(3, 600)], batch_size=1)
    await finish(handlers, at(1000))
    alerts = await stream_alerts(redis)
    assert [(a["status"], a["first_seen"]) for a in alerts] == [
        ("open", iso(at(100))),
        ("resolved", iso(at(100))),
        ("open", iso(at(600))),
    ]
    assert alerts[1]["resolved_at"] == iso(at(500))


async def test_gauge_counts_currently_blocked_sims_per_fleet(redis: Redis) -> None:
    """``blocked_sims`` counts blocked SIMs per fleet, shared by every handler instance."""
    first = handler("data_limit", redis, Clock(at(3600)))
    other = handler("data_limit", redis, Clock(at(3600)))
    assert isinstance(first, DataLimitHandler)
    assert isinstance(other, DataLimitHandler)
    await feed(
        [first],
        [
            blocked(1, 0, sim=SIM_A, fleet=FLEET_A),
            blocked(2, 0, sim=SIM_B, fleet=FLEET_A),
            blocked(3, 0, sim="HS" + "c" * 32, fleet=FLEET_B),
        ],
    )
    await finish([first], at(60))  # event time past the blocked events by the grace
    assert await other.blocked_sims() == {FLEET_A: 2, FLEET_B: 1}
    await feed([other], [event("data-session.updated", 4, 10, sim=SIM_B, fleet=FLEET_A)])
    await finish([other], at(100))
    assert await first.blocked_sims() == {FLEET_A: 1, FLEET_B: 1}
    await first.close()
    await other.close()


async def test_late_blocked_event_before_an_earlier_unblocking_stays_out(redis: Redis) -> None:
    """A blocked event older than the unblocking that ended the previous episode does not
    join the current one."""
    handlers = [handler("data_limit", redis, Clock(at(3600)))]
    await feed(
        handlers,
        [blocked(1, 100), blocked(2, 200), event("data-session.updated", 3, 300), blocked(4, 400)],
    )
    await finish(handlers, at(500))
    await feed(handlers, [blocked(5, 50)])
    await feed(handlers, [event("data-session.updated", 6, 600)])
    await finish(handlers, at(700))
    alerts = await stream_alerts(redis)
    assert [(a["status"], a["first_seen"]) for a in alerts] == [
        ("open", iso(at(100))),
        ("resolved", iso(at(100))),
        ("open", iso(at(400))),
        ("resolved", iso(at(400))),
    ]
    assert (alerts[3]["count"], alerts[3]["resolved_at"]) == (1, iso(at(600)))


async def test_open_episode_never_expires_and_closed_one_does(redis: Redis) -> None:
    """A blocked SIM's episode stays until it is unblocked, however long that takes; then its
    state expires after the retention."""
    handlers = [handler("data_limit", redis, Clock(at(3600)))]
    await feed(handlers, [blocked(1, 0)])
    await finish(handlers, at(60))  # event time past the blocked event by the grace: it opens
    (state,) = [key async for key in redis.scan_iter(match="*:s:data_limit_reached:*")]
    assert await redis.ttl(state) == -1
    await feed(handlers, [event("data-session.updated", 2, 10)])
    await finish(handlers, at(100))
    assert await redis.ttl(state) > 0


async def test_gauge_follows_a_sim_that_moved_fleets_while_blocked(redis: Redis) -> None:
    """A SIM blocked in one fleet and unblocked after moving to another leaves no gauge behind."""
    data_limit = handler("data_limit", redis, Clock(at(3600)))
    assert isinstance(data_limit, DataLimitHandler)
    await feed([data_limit], [blocked(1, 0, fleet=FLEET_A)])
    await finish([data_limit], at(60))  # event time past the blocked event by the grace
    assert await data_limit.blocked_sims() == {FLEET_A: 1}
    await feed(
        [data_limit],
        [blocked(2, 5, fleet=FLEET_B), event("data-session.updated", 3, 10, fleet=FLEET_B)],
    )
    await finish([data_limit], at(100))
    assert await data_limit.blocked_sims() == {}
    await data_limit.close()


async def test_episode_split_by_a_late_unblocking_keeps_its_usage(redis: Redis) -> None:
    """The blocked events after a late unblocked event open their own episode with the
    usage their first event reported, as when delivered in order."""
    handlers = [handler("data_limit", redis, Clock(at(3600)))]
    await feed(handlers, [blocked(1, 10), blocked(2, 20), blocked(3, 30)])
    await feed(handlers, [event("data-session.updated", 4, 15)])
    await finish(handlers, at(1000))
    alerts = await stream_alerts(redis)
    assert [(a["status"], a["first_seen"]) for a in alerts] == [
        ("open", iso(at(10))),
        ("resolved", iso(at(10))),
        ("open", iso(at(20))),
    ]
    assert alerts[1]["count"] == 1
    assert alerts[2]["details"]["usage_at_block"]["session_total"] == 0
    assert alerts[2]["details"]["usage_at_block"]["event_type"] == "data-session.updated"


async def test_open_episode_saved_with_an_expiry_is_kept_from_the_next_start(
    redis: Redis,
) -> None:
    """An open episode's state that still carries an expiry (saved by an older version) is
    kept from a handler's first call on."""
    first = handler("data_limit", redis, Clock(at(3600)))
    await feed([first], [blocked(1, 0)])
    await finish([first], at(60))  # event time past the blocked event by the grace: it opens
    (state,) = [key async for key in redis.scan_iter(match="*:s:data_limit_reached:*")]
    await redis.expire(state, 1000)
    later = handler("data_limit", redis, Clock(at(3600)))
    await feed([later], [event("data-session.updated", 2, 10, sim=SIM_B)])
    assert await redis.ttl(state) == -1
    await close_all([first, later])
