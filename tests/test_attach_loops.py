"""The ``attach_loops`` handler against a real redis: devices that attach but never get data."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from alerts_support import (
    NOISY,
    SIM_A,
    SIM_B,
    Clock,
    at,
    context,
    event,
    feed,
    finish,
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

from worker.events.records import ConnectionEvent, EventKind
from worker.handlers.alerts.episodes import Subjects
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.rules.attach_loops import AttachLoopsHandler


async def test_one_alert_per_attach_loop_and_none_for_normal_sims(redis: Redis) -> None:
    """Every attach loop of the ground truth alerts once, exactly, and normal SIMs never alert."""
    events, truth = simulated(**NOISY)
    end = sim_end(NOISY)
    handlers = [handler("attach_loops", redis, Clock(end))]
    await feed(handlers, events, batch_size=300)
    await finish(handlers, end + timedelta(hours=1))
    alerts = await stream_alerts(redis)
    assert truth["attach_loops"]
    matched = match(alerts, "attach_loop", truth["attach_loops"], sim_subject)
    assert matched.not_exactly_once == []
    assert matched.extra == []
    for episode, (alert,) in matched.found:
        assert alert["status"] == "resolved"
        assert (alert["first_seen"], alert["last_seen"]) == (episode["first"], episode["last"])
        assert alert["count"] == episode["count"]


async def test_repeated_accepts_without_session_open_one_alert_with_apn_hint(redis: Redis) -> None:
    """Five attachments in the window without a data session open one alert hinting at the APN."""
    handlers = [handler("attach_loops", redis, Clock(at(3600)))]
    await feed(handlers, [event("attachment.accepted", i, i * 30) for i in range(5)])
    await finish(handlers, at(120 + 60))  # event time past the fifth attachment by the grace
    (alert,) = await stream_alerts(redis)
    assert (alert["kind"], alert["sim_sid"], alert["count"]) == ("attach_loop", SIM_A, 5)
    assert alert["opened_at"] == iso(at(120))
    assert "APN is `super`" in alert["hint"]
    assert alert["details"]["networks"] == [
        {"network": "US-310-260", "name": "T-Mobile", "count": 5}
    ]


async def test_data_sessions_between_attachments_prevent_the_alert(redis: Redis) -> None:
    """Attachments each followed by a data session never alert, even if the sessions arrive first."""
    accepts = [event("attachment.accepted", i, i * 30) for i in range(8)]
    starts = [event("data-session.started", i, i * 30 + 5) for i in range(8)]
    handlers = [handler("attach_loops", redis, Clock(at(3600)))]
    await feed(handlers, starts + accepts, batch_size=100)
    await finish(handlers, at(1000))
    assert await stream_alerts(redis) == []


async def test_loop_resolves_when_a_data_session_starts(redis: Redis) -> None:
    """A data session after the loop resolves it, at the session's event time."""
    handlers = [handler("attach_loops", redis, Clock(at(3600)))]
    loop = [event("attachment.accepted", i, i * 30) for i in range(6)]
    await feed(handlers, [*loop, event("data-session.started", 1, 200)])
    await finish(handlers, at(300))
    opened, resolved = await stream_alerts(redis)
    assert (resolved["id"], resolved["status"]) == (opened["id"], "resolved")
    assert resolved["resolved_at"] == iso(at(200))
    assert resolved["resolution"] == "a data session started"


class SkipsSimB(AttachLoopsHandler):
    """A rule built on the attach-loop rule with the original API: its ``collect`` drops
    one SIM's events and hands the rest to the rule's own (``super().collect``)."""

    calls = 0

    def collect(self, events: Sequence[ConnectionEvent], subjects: Subjects) -> None:
        self.calls += 1
        super().collect([e for e in events if e.envelope.data.sim_sid != SIM_B], subjects)


async def test_a_rule_overriding_collect_of_a_built_in_gets_every_batch(redis: Redis) -> None:
    """``handle`` calls the method the class defines nearest (here ``collect``, though the
    built-in rule provides ``collect_kinds``), and ``super().collect`` reaches the rule."""
    rule = SkipsSimB(context(redis), settings=settings(), clock=Clock(at(3600)))
    loops = [
        event("attachment.accepted", i, i * 30, sim=sim) for sim in (SIM_A, SIM_B) for i in range(5)
    ]
    await feed([rule], loops, batch_size=4)
    await finish([rule], at(120 + 60))
    (alert,) = await stream_alerts(redis)
    assert (alert["kind"], alert["sim_sid"], alert["count"]) == ("attach_loop", SIM_A, 5)
    assert rule.calls == 3


class CallsSuper(AlertHandler):
    """A rule whose ``collect`` calls its base's, which must not call it back."""

    name = "attach_loops"
    rules = AttachLoopsHandler.rules
    render = AttachLoopsHandler.render
    collected = 0

    def collect(self, events: Sequence[ConnectionEvent], subjects: Subjects) -> None:
        self.collected += len(events)
        super().collect(events, subjects)


class CallsSuperKinds(CallsSuper):
    """The same with ``collect_kinds``, which ``handle`` then calls instead."""

    def collect_kinds(
        self, events: Sequence[ConnectionEvent], kinds: Sequence[EventKind], subjects: Subjects
    ) -> None:
        self.collected += 10 * len(events)
        super().collect_kinds(events, kinds, subjects)


@pytest.mark.parametrize(("rule_class", "collected"), [(CallsSuper, 5), (CallsSuperKinds, 55)])
async def test_the_defaults_called_through_super_do_not_call_back(
    redis: Redis, rule_class: type[CallsSuper], collected: int
) -> None:
    """Through ``super()``, ``AlertHandler``'s ``collect`` calls a ``collect_kinds`` only
    when the class has one (here ``CallsSuperKinds``, whose base's ``collect`` then runs
    once), and its ``collect_kinds`` a ``collect`` only when the class has one: no loop."""
    rule = rule_class(context(redis), settings=settings(), clock=Clock(at(3600)))
    await feed([rule], [event("attachment.accepted", i, i * 30) for i in range(5)], batch_size=2)
    await finish([rule], at(120 + 60))
    assert rule.collected == collected
    assert await stream_alerts(redis) == []


def test_a_rule_providing_neither_collect_nor_collect_kinds_is_refused(redis: Redis) -> None:
    class Neither(AlertHandler):
        name = "neither"
        rules = AttachLoopsHandler.rules
        render = AttachLoopsHandler.render

    with pytest.raises(TypeError, match="Neither must provide collect or collect_kinds"):
        Neither(context(redis), settings=settings())
