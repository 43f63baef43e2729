"""The ``rejections`` handler against a real redis: storms, fleet episodes, failure bursts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from alerts_support import (
    FLEET_A,
    FLEET_B,
    NOISY,
    SIM_A,
    SIM_B,
    Clock,
    at,
    by_status,
    event,
    feed,
    finish,
    fleet_subject,
    handler,
    iso,
    match,
    settings,
    sim_end,
    sim_subject,
    simulated,
    stream_alerts,
)
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.rules.rejections import HINTS
from worker.handlers.alerts.settings import ThresholdOverrides


def rejections(
    count: int,
    *,
    start: float = 0,
    step: float = 10,
    code: int = 83705,
    seq0: int = 0,
    sim: str = SIM_A,
    fleet: str = FLEET_A,
) -> list[ConnectionEvent]:
    """``count`` rejections of one SIM, ``step`` seconds apart, alternating two networks."""
    networks = ({"network__mnc": "260"}, {"network__mnc": "410", "network__friendly_name": "AT&T"})
    return [
        event(
            "attachment.rejected",
            seq0 + i,
            start + i * step,
            sim=sim,
            fleet=fleet,
            error__code=code,
            **networks[i % 2],
        )
        for i in range(count)
    ]


async def test_one_alert_per_injected_episode_and_none_elsewhere(redis: Redis) -> None:
    """With duplicates, shuffling and both envelopes each storm, fleet episode and burst alerts once."""
    events, truth = simulated(**NOISY)
    end = sim_end(NOISY)
    clock = Clock(end)
    handlers = [handler("rejections", redis, clock)]
    await feed(handlers, events)
    await finish(handlers, end + timedelta(hours=1))
    alerts = await stream_alerts(redis)

    storms = match(alerts, "rejection_storm", truth["rejection_storms"], sim_subject)
    fleet = match(
        alerts, "fleet_network_rejections", truth["fleet_rejection_episodes"], fleet_subject
    )
    bursts = truth["failure_bursts"]
    attach = [b for b in bursts if b["kind"] == "attachment.failed"]
    session = [b for b in bursts if b["kind"] == "data-session.failed"]
    failed_attach = match(alerts, "attachment_failure_burst", attach, sim_subject)
    failed_session = match(alerts, "data_session_failure_burst", session, sim_subject)
    assert truth["rejection_storms"]
    assert truth["fleet_rejection_episodes"]
    assert attach
    assert session
    for matched in (storms, fleet, failed_attach, failed_session):
        assert matched.not_exactly_once == [], matched.kind
        assert matched.extra == [], matched.kind
    for episode, (alert,) in storms.found:
        assert alert["first_seen"] == episode["first"]
        assert alert["last_seen"] == episode["last"]
        assert alert["count"] == episode["count"]
        assert {str(c["code"]): c["count"] for c in alert["details"]["codes"]} == episode["codes"]
        assert sorted(n["network"] for n in alert["details"]["networks"]) == episode["networks"]
    for episode, (alert,) in fleet.found:
        assert alert["details"]["network"]["sid"] == episode["network_sid"]
        assert alert["count"] >= episode["distinct_sims"]
    for episode, (alert,) in failed_attach.found + failed_session.found:
        assert (alert["first_seen"], alert["count"]) == (episode["first"], episode["count"])


async def test_every_opened_alert_is_resolved_once(redis: Redis) -> None:
    """Each open alert is followed by exactly one resolved alert with the same id."""
    events, _ = simulated(**NOISY)
    end = sim_end(NOISY)
    handlers = [handler("rejections", redis, Clock(end))]
    await feed(handlers, events)
    await finish(handlers, end + timedelta(hours=1))
    alerts = await stream_alerts(redis)
    opened = [a["id"] for a in alerts if a["status"] == "open"]
    resolved = [a["id"] for a in alerts if a["status"] == "resolved"]
    assert opened
    assert sorted(opened) == sorted(resolved)
    assert all(a["resolution"] and a["resolved_at"] for a in alerts if a["status"] == "resolved")


@pytest.mark.parametrize(
    ("code", "phrase"),
    [
        (83704, "`new`"),
        (83705, "`inactive`"),
        (83702, "Network Access Profile"),
        (83703, "re-attaches too often"),
    ],
)
async def test_storm_alert_details_and_hint_follow_the_code(
    redis: Redis, code: int, phrase: str
) -> None:
    """A storm alert names the SIM and fleet, counts codes and networks, and hints from the code."""
    clock = Clock(at(3600))
    handlers = [handler("rejections", redis, clock)]
    await feed(handlers, rejections(12, code=code))
    await finish(handlers, at(110 + 60))  # event time past the last rejection by the grace
    (alert,) = await stream_alerts(redis)
    assert alert["kind"] == "rejection_storm"
    assert (alert["sim_sid"], alert["fleet_sid"], alert["status"]) == (SIM_A, FLEET_A, "open")
    assert [c["code"] for c in alert["details"]["codes"]] == [code]
    assert {n["network"]: n["count"] for n in alert["details"]["networks"]} == {
        "US-310-260": 6,
        "US-310-410": 6,
    }
    assert alert["count"] == 12
    assert alert["opened_at"] == iso(at(90))
    assert phrase in alert["hint"]
    assert HINTS[code] in alert["hint"]


async def test_storm_resolves_when_the_sim_attaches(redis: Redis) -> None:
    """An attachment resolves the storm at its event time, once event time is past it by the grace."""
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    await feed(handlers, [*rejections(12), event("attachment.accepted", 1, 200)])
    await finish(handlers, at(200 + 59))
    assert [a["status"] for a in await stream_alerts(redis)] == ["open"]
    await finish(handlers, at(200 + 61))
    opened, resolved = await stream_alerts(redis)
    assert (opened["status"], resolved["status"]) == ("open", "resolved")
    assert resolved["id"] == opened["id"]
    assert resolved["resolved_at"] == iso(at(200))
    assert resolved["resolution"] == "the SIM attached successfully"


async def test_quiet_storm_closes_only_after_its_window_in_event_time(redis: Redis) -> None:
    """A storm closes only when event time (tick or batches) passes its last rejection by window and grace."""
    clock = Clock(at(3600))
    handlers = [handler("rejections", redis, clock)]
    await feed(handlers, rejections(12))  # last rejection at 110 s
    await finish(handlers, at(110 + 300 + 59))
    assert [a["status"] for a in await stream_alerts(redis)] == ["open"]
    clock.advance(30)  # past the shard warm-up: batches alone may now close episodes
    await feed(handlers, [event("attachment.accepted", 1, 110 + 300 + 61, sim=SIM_B)])
    await handlers[0].flush()
    alerts = await stream_alerts(redis)
    assert [a["status"] for a in alerts] == ["open", "resolved"]
    assert alerts[1]["resolved_at"] == iso(at(410))
    assert alerts[1]["resolution"] == "quiet for 5 min"


async def test_too_few_or_too_spread_rejections_alert_nothing(redis: Redis) -> None:
    """Nine rejections in the window, or ten spread over more than the window, open nothing."""
    handlers = [handler("rejections", redis, Clock(at(7200)))]
    await feed(handlers, rejections(9) + rejections(10, start=1000, step=40, seq0=100))
    await finish(handlers, at(3600))
    assert await stream_alerts(redis) == []


async def test_duplicates_replays_and_late_events_do_not_repeat_alerts(redis: Redis) -> None:
    """Duplicates, both envelopes, reversed order and a full replay still give one open and one resolved alert."""
    storm = rejections(15)
    kore = [
        event("attachment.rejected", i, i * 10, vendor="kore", error__code=83705) for i in range(15)
    ]
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    await feed(handlers, storm[10:] + kore[:5], batch_size=4)
    await feed(handlers, list(reversed(storm[:10])) + kore, batch_size=3)
    await finish(handlers, at(1000))
    await feed(handlers, storm + kore, batch_size=7)
    await finish(handlers, at(2000))
    alerts = await stream_alerts(redis)
    assert [a["status"] for a in alerts] == ["open", "resolved"]
    assert alerts[1]["count"] == 15
    assert alerts[1]["first_seen"] == iso(at(0))


async def test_thresholds_can_be_set_per_fleet(redis: Redis) -> None:
    """A fleet override lowers the storm threshold for that fleet only."""
    tuned = settings(fleets={FLEET_B: ThresholdOverrides(storm_rejections=3)})
    handlers = [handler("rejections", redis, Clock(at(3600)), tuned)]
    await feed(
        handlers,
        rejections(4, sim=SIM_A, fleet=FLEET_A) + rejections(4, sim=SIM_B, fleet=FLEET_B, seq0=50),
    )
    await finish(handlers, at(100))
    (alert,) = await stream_alerts(redis)
    assert (alert["sim_sid"], alert["count"]) == (SIM_B, 4)


def _many_sims(code: int, sims: int = 25) -> list[ConnectionEvent]:
    return [
        event(
            "attachment.rejected",
            i,
            i * 5,
            sim=f"HS{i:032x}",
            error__code=code,
            error__message="DIAMETER_ERROR_ROAMING_NOT_ALLOWED",
        )
        for i in range(sims)
    ]


async def test_fleet_alert_when_many_sims_are_rejected_on_one_network(redis: Redis) -> None:
    """25 SIMs rejected (83702) on one network open one critical fleet alert; SIM-state codes do not count."""
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    await feed(handlers, _many_sims(83705))
    await finish(handlers, at(1000))
    assert await stream_alerts(redis) == []
    later = [
        event("attachment.rejected", 500 + i, 2000 + i * 5, sim=f"HS{i:032x}", error__code=83702)
        for i in range(25)
    ]
    await feed(handlers, later)
    await finish(handlers, at(3000))
    opened, resolved = await stream_alerts(redis)
    assert opened["kind"] == "fleet_network_rejections"
    assert opened["severity"] == "critical"
    assert opened["subject"] == f"fleet:{FLEET_A}/network:US-310-260"
    assert opened["count"] == 25
    assert resolved["count"] == 25
    assert opened["details"]["network"]["name"] == "T-Mobile"
    assert "Network Access Profile" in opened["hint"]


async def test_data_session_failure_burst_resolves_when_a_session_starts(redis: Redis) -> None:
    """Ten data-session.failed events open a burst; data-session.started resolves it."""
    failures = [event("data-session.failed", i, i * 10) for i in range(10)]
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    await feed(handlers, [*failures, event("data-session.started", 1, 150)])
    await finish(handlers, at(300))
    alerts = await stream_alerts(redis)
    assert [(a["kind"], a["status"]) for a in alerts] == [
        ("data_session_failure_burst", "open"),
        ("data_session_failure_burst", "resolved"),
    ]
    assert alerts[1]["resolution"] == "a data session started"
    assert (
        by_status(alerts, "data_session_failure_burst", "open")[0]["details"]["codes"][0]["code"]
        == 83701
    )


@pytest.mark.parametrize(
    ("attached_before", "late_attachment"),
    [
        # A late rejection before an attachment that precedes the storm neither joins it
        # nor lets a later late attachment end and re-open it under the same id.
        (950, 970),
        # A late rejection extends the storm back; an attachment arriving later between
        # the two takes it out again instead of ending the storm.
        (None, 950),
    ],
)
async def test_late_rejection_before_the_storm_never_splits_or_reopens_it(
    redis: Redis, attached_before: int | None, late_attachment: int
) -> None:
    """A rejection arriving late just before the storm, with an attachment between the two
    (seen before it or after it), leaves the storm one alert of its own rejections."""
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    early = [event("attachment.accepted", 900, attached_before)] if attached_before else []
    await feed(handlers, [*early, *rejections(10, start=1000)])
    await feed(handlers, rejections(1, start=900, seq0=50, code=83704))
    await feed(handlers, [event("attachment.accepted", 901, late_attachment)])
    await finish(handlers, at(1100))
    await feed(handlers, rejections(1, start=1100, seq0=60))
    await feed(handlers, [event("attachment.accepted", 902, 1200)])
    await finish(handlers, at(1300))
    opened, resolved = await stream_alerts(redis)
    assert (opened["status"], resolved["status"], resolved["id"]) == (
        "open",
        "resolved",
        opened["id"],
    )
    assert (resolved["first_seen"], resolved["count"]) == (iso(at(1000)), 11)
    assert [(c["code"], c["count"]) for c in resolved["details"]["codes"]] == [(83705, 11)]
    assert resolved["resolved_at"] == iso(at(1200))


async def test_late_attachment_inside_the_storm_never_resolves_it_before_it_opened(
    redis: Redis,
) -> None:
    """An attachment arriving after the storm opened, between its first rejection and the one
    that met the threshold, resolves it, at the opening time at the earliest."""
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    await feed(handlers, rejections(10, start=1000))
    await finish(handlers, at(1090 + 60))  # event time passes the storm by the grace: it opens
    assert [a["status"] for a in await stream_alerts(redis)] == ["open"]
    await feed(handlers, [event("attachment.accepted", 901, 1045)])
    await finish(handlers, at(1200))
    opened, resolved = await stream_alerts(redis)
    assert opened["opened_at"] == iso(at(1090))
    assert (resolved["id"], resolved["resolved_at"]) == (opened["id"], iso(at(1090)))


async def test_late_rejection_after_a_quiet_close_does_not_hide_the_next_storm(
    redis: Redis,
) -> None:
    """A rejection arriving after its storm closed quietly joins it without extending it,
    so a storm after the quiet end alerts again."""
    handlers = [handler("rejections", redis, Clock(at(3600)))]
    await feed(handlers, rejections(10))
    await finish(handlers, at(90 + 300 + 61))
    await feed(handlers, rejections(1, start=350, seq0=100))
    await feed(handlers, rejections(10, start=600, seq0=200))
    await finish(handlers, at(2000))
    alerts = await stream_alerts(redis)
    assert [a["status"] for a in alerts] == ["open", "resolved", "open", "resolved"]
    assert alerts[0]["id"] == alerts[1]["id"] != alerts[2]["id"] == alerts[3]["id"]
    assert alerts[1]["resolved_at"] == iso(at(390))
    assert (alerts[2]["first_seen"], alerts[3]["count"]) == (iso(at(600)), 10)


async def test_late_attachment_and_rejection_in_one_batch_count_exactly(redis: Redis) -> None:
    """A late attachment inside a storm, arriving with a late rejection after it, leaves
    the storm exactly the rejections before the attachment."""
    low = settings(fleets={FLEET_A: ThresholdOverrides(storm_rejections=2)})
    handlers = [handler("rejections", redis, Clock(at(3600)), low)]
    await feed(handlers, [rejections(1, start=t, seq0=t)[0] for t in (10, 20, 30, 40, 50)])
    await feed(handlers, [event("attachment.accepted", 900, 25), *rejections(1, start=35, seq0=35)])
    await finish(handlers, at(1000))
    first = [a for a in await stream_alerts(redis) if a["first_seen"] == iso(at(10))]
    opened, resolved = first
    assert (resolved["id"], resolved["count"], resolved["resolved_at"]) == (
        opened["id"],
        2,
        iso(at(25)),
    )
    assert [(c["code"], c["count"]) for c in resolved["details"]["codes"]] == [(83705, 2)]


async def test_attachment_in_the_same_second_as_a_rejection_comes_after_it(redis: Redis) -> None:
    """A hit and a clear with equal event times: the clear follows the hit, whatever
    order they arrive in, so it splits the storm there."""
    low = settings(fleets={FLEET_A: ThresholdOverrides(storm_rejections=3)})
    for order in ([10, "clear", 20, 30], [30, "clear", 10, 20], ["clear", 10, 30, 20]):
        handlers = [handler("rejections", redis, Clock(at(3600)), low)]
        for item in order:
            if item == "clear":
                await feed(handlers, [event("attachment.accepted", 900, 20)])
            else:
                await feed(handlers, rejections(1, start=int(item), seq0=int(item)))
        await finish(handlers, at(1000))
        assert await stream_alerts(redis) == [], order
        await redis.flushall()


async def test_fleet_alert_counts_only_the_sims_of_its_episode(redis: Redis) -> None:
    """A SIM rejected after the fleet episode ended is not counted in its resolution."""
    low = settings(fleets={FLEET_A: ThresholdOverrides(fleet_sims=3)})
    handlers = [handler("rejections", redis, Clock(at(3600)), low)]
    await feed(handlers, _many_sims(83702, sims=3))
    await feed(
        handlers, [event("attachment.rejected", 99, 1000, sim=f"HS{99:032x}", error__code=83702)]
    )
    await finish(handlers, at(2000))
    fleet = [a for a in await stream_alerts(redis) if a["kind"] == "fleet_network_rejections"]
    assert [(a["status"], a["count"]) for a in fleet] == [("open", 3), ("resolved", 3)]
