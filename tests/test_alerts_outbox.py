"""The outbox and dispatcher: claims, crashes between claim and delivery, round trips."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
import servers
from alerts_support import (
    STREAM,
    Clock,
    at,
    close_all,
    event,
    feed,
    finish,
    handler,
    settings,
    stream_alerts,
    webhook_settings,
)
from redis.asyncio import Redis

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.dispatch import Dispatcher, RetryPolicy
from worker.handlers.alerts.episodes import Subjects
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.model import Alert, to_ms
from worker.handlers.alerts.outbox import Outcome, Settlement
from worker.handlers.alerts.sinks import SendResult
from worker.handlers.base import Batch


class CountingRedis(Redis):
    """A client that counts the commands it sends (each one is a round trip)."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return await super().execute_command(*args, **options)


def storm(seq0: int = 0, start: float = 0) -> list[ConnectionEvent]:
    return [event("attachment.rejected", seq0 + i, start + i * 10) for i in range(12)]


OPENED = at(110 + 60)
"""Event time past ``storm()``'s last rejection by the grace: the storm is open."""
CLAIM = 8
"""How many due entries a direct ``store.apply`` claims (one round's worth)."""


async def test_each_batch_costs_one_redis_round_trip_per_handler(redis_url: str) -> None:
    """Handling a batch costs one EVALSHA per handler; a delivery round one more, off the
    batch path."""
    client = CountingRedis.from_url(redis_url)
    client.sent = []
    clock = Clock(at(3600))
    handlers = [handler(n, client, clock) for n in ("rejections", "attach_loops")]
    quiet = [event("data-session.updated", i, i) for i in range(50)]
    await feed(handlers, [*quiet, *storm(300, 2000)])  # loads both scripts (once per process)
    await finish(handlers, at(2110 + 60))  # the storm opens and is delivered
    clock.advance(30)  # past the shard warm-up: batches alone move event time on
    client.sent.clear()
    for n in range(5):
        await feed(handlers, [event("data-session.started", 100 + n, 100 + n), *quiet])
    assert client.sent == ["EVALSHA"] * 10
    await handlers[1].flush()
    client.sent.clear()
    # Event time moves past the new storm by the grace: the first one closes, this one opens.
    await feed(handlers[:1], [*storm(200, 3000), event("data-session.updated", 99, 3110 + 60)])
    assert client.sent == ["EVALSHA"]
    await handlers[0].flush()
    # The round's settle; resolutions whose opening went out in an earlier round check it
    # is no longer pending (HEXISTS, pipelined: one round trip per round); and the flush
    # (only a run that ends caught up calls it) counts what the outbox still holds (HLEN).
    assert [sent for sent in client.sent if sent != "HEXISTS"] == ["EVALSHA"] * 2 + ["HLEN"]
    assert [a["status"] for a in await stream_alerts(client)] == ["open", "resolved", "open"]
    await close_all(handlers)
    await client.aclose()


async def test_claim_of_a_crashed_worker_is_delivered_by_another_once(redis: Redis) -> None:
    """A dead worker's claimed alerts are delivered by another after the lease, once, even if it settles late."""
    clock = Clock(at(3600))
    crashed = handler("rejections", redis, clock)
    subjects = Subjects()
    crashed.collect(storm(), subjects)
    now_ms = round(clock() * 1000)
    applied = await crashed.store.apply(subjects, now_ms=now_ms, shard="s0", claim=CLAIM)
    assert applied.claimed == []  # event time has not passed the storm yet
    tick_ms = to_ms(OPENED)
    applied = await crashed.store.apply(Subjects(), now_ms=now_ms, tick_ms=tick_ms, claim=CLAIM)
    assert len(applied.claimed) == 2  # log and stream entries of the open alert
    assert await stream_alerts(redis) == []

    survivor = handler("rejections", redis, clock)
    await survivor.tick(OPENED)
    await survivor.flush()
    assert await stream_alerts(redis) == []  # still leased to the crashed worker
    clock.advance(2 * settings().webhook.round_seconds + 11)  # past the claim's lease
    await survivor.tick(OPENED)
    await survivor.flush()
    (alert,) = await stream_alerts(redis)

    late = [
        Settlement(c.entry, Outcome.DONE, c.fence, stream_fields=("id", alert["id"]))
        for c in applied.claimed
    ]
    settled = await crashed.outbox.settle(late, now_ms=0)
    assert settled[:5] == (0, 0, 0, 0, 0)
    assert sorted(settled.stale) == sorted(c.entry for c in applied.claimed)
    assert len(await redis.xrange(STREAM)) == 1
    await close_all([crashed, survivor])


async def test_entries_of_a_sink_no_longer_enabled_are_dead_lettered(
    redis: Redis, closed_port: int
) -> None:
    """Alerts waiting for a sink that was switched off are dead-lettered with the reason."""
    clock = Clock(at(3600))
    down = f"http://{servers.HOST}:{closed_port}/alerts"
    before = handler("rejections", redis, clock, webhook_settings(down, attempts=1))
    await feed([before], storm())
    await before.tick(OPENED)
    await before.flush()
    assert await before.outbox.pending() == 1
    after = handler("rejections", redis, clock, settings())
    clock.advance(3600)
    await after.tick(OPENED)
    await after.flush()
    assert await after.outbox.pending() == 0
    ((entry, letter),) = (await after.outbox.dead()).items()
    assert entry.startswith("webhook|")
    assert letter["reason"] == "sink webhook is not enabled"
    await close_all([before, after])


class BrokenSink:
    name = "log"

    async def send(self, alert: Alert) -> SendResult:
        raise RuntimeError(f"bug while sending {alert.id}")

    async def close(self) -> None:
        return None


async def test_a_failing_dispatcher_surfaces_its_error(redis: Redis) -> None:
    """A sink bug is not swallowed: ``flush`` (and the next batch) raise it."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    subjects = Subjects()
    worker.collect(storm(), subjects)
    now_ms = round(clock() * 1000)
    await worker.store.apply(subjects, now_ms=now_ms, shard="s0")
    tick_ms = to_ms(OPENED)
    applied = await worker.store.apply(Subjects(), now_ms=now_ms, tick_ms=tick_ms, claim=CLAIM)
    assert applied.claimed  # the open alert's entries
    dispatcher = Dispatcher(
        outbox=worker.outbox,
        sinks={"log": BrokenSink()},
        render=worker.render,
        retry=RetryPolicy(*(settings().webhook.retry_base,) * 2, settings().webhook.max_age),
        lease_ms=60_000,
        send_ms=0,
        clock=clock,
    )
    dispatcher.submit(applied.claimed, CLAIM)
    with pytest.raises(RuntimeError, match="alert dispatcher failed") as raised:
        await dispatcher.flush()
    assert "bug while sending" in str(raised.value.__cause__)
    await dispatcher.close(grace=1.0)
    await close_all([worker])


async def test_empty_batches_cost_nothing(redis_url: str) -> None:
    """A batch without events sends nothing to redis."""
    client = CountingRedis.from_url(redis_url)
    client.sent = []
    worker = handler("data_limit", client, Clock(at(3600)))
    await worker.handle(Batch("shardId-000000000000", []))
    assert client.sent == []
    await close_all([worker])
    await client.aclose()


async def test_a_tick_that_finds_the_dispatcher_busy_has_its_entries_claimed(
    redis: Redis,
) -> None:
    """A tick that writes a resolution while the dispatcher is busy gets no claim of its
    own; the dispatcher claims for it after the tick wrote, even when the round under way
    ends and claims again before the tick's script has run (a race seen under load)."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    stream_sink = worker.sinks["stream"]
    sending = asyncio.Event()
    unblock = asyncio.Event()

    class HeldSink:
        name = "stream"
        remote = False

        async def send(self, alert: Alert) -> SendResult:
            sending.set()
            await unblock.wait()
            return await stream_sink.send(alert)

        async def close(self) -> None:
            return None

    worker.sinks["stream"] = HeldSink()
    worker.dispatcher._sinks["stream"] = worker.sinks["stream"]
    claims: list[int] = []
    claim = worker.outbox.claim

    async def counting_claim(*args: Any) -> Any:
        found = await claim(*args)
        claims.append(len(found))
        return found

    worker.outbox.claim = counting_claim  # type: ignore[method-assign]
    apply = worker.store.apply

    async def apply_after_the_next_claim(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("tick_ms"):
            before = len(claims)
            unblock.set()  # the round ends and (old code) claims again, finding nothing
            while len(claims) == before and worker.dispatcher._queued:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        return await apply(*args, **kwargs)

    worker.store.apply = apply_after_the_next_claim  # type: ignore[method-assign]
    await feed([worker], storm(), shard="s0")
    await worker.tick(OPENED)  # opens the storm: its alert is claimed and held in the sink
    await asyncio.wait_for(sending.wait(), 5)
    await worker.tick(at(110 + 300 + 60 + 1))  # quiet: resolved while the opening is held
    await asyncio.wait_for(worker.flush(), 5)
    assert [a["status"] for a in await stream_alerts(redis)] == ["open", "resolved"]
    await close_all([worker])


async def flush_all(worker: AlertHandler) -> None:
    """Flush until the dispatcher's failure surfaces (or nothing is left)."""
    for _ in range(20):
        await worker.flush()


async def test_a_round_that_fails_while_a_claim_was_asked_does_not_stop_claims(
    redis: Redis,
) -> None:
    """A sink bug fails the delivery task in a round that carried a claim request: the
    failure surfaces once, and later ticks still claim and deliver (a request left marked
    as pending used to stop every later claim for good)."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    stream_sink = worker.sinks["stream"]
    release = asyncio.Event()
    asked = False
    failed = False

    class BuggySink:
        name = "stream"
        remote = False

        async def send(self, alert: Alert) -> SendResult:
            nonlocal failed
            after_the_ask = asked
            await release.wait()
            if after_the_ask and not failed:  # the first send of the round with the ask
                failed = True
                raise LookupError("a bug in the sink")
            return await stream_sink.send(alert)

        async def close(self) -> None:
            return None

    worker.sinks["stream"] = BuggySink()
    worker.dispatcher._sinks["stream"] = worker.sinks["stream"]
    sims = [f"HS{n:032d}" for n in range(CLAIM + 1)]
    storms = [
        event("attachment.rejected", 1000 * n + i, i * 10, sim=sim)
        for n, sim in enumerate(sims)
        for i in range(12)
    ]
    await feed([worker], storms, shard="s0")
    await worker.tick(OPENED)  # one full round of openings claimed; its sends wait
    await feed([worker], [event("data-session.updated", 99_999, 500)], shard="s0")  # asks
    asked = True
    release.set()  # the full round claims more; the next round, with the ask, fails
    with pytest.raises(RuntimeError, match="alert dispatcher failed"):
        await asyncio.wait_for(flush_all(worker), 10)
    for minutes in (10, 20, 30):  # later ticks claim again, once the failed claim's lease ran out
        clock.set(at(3600) + timedelta(minutes=minutes))
        await worker.tick(at(110 + 300 + 60 + 1))
        await asyncio.wait_for(worker.flush(), 5)
    opened = [a for a in await stream_alerts(redis) if a["status"] == "open"]
    resolved = [a for a in await stream_alerts(redis) if a["status"] == "resolved"]
    assert len({a["id"] for a in opened}) == len(sims)
    assert len({a["id"] for a in resolved}) == len(sims)
    await close_all([worker])


class HeldStreamSink:
    """The stream sink of ``worker``, holding each send until ``unblock`` is set."""

    name = "stream"
    remote = False

    def __init__(self, worker: AlertHandler) -> None:
        self._inner = worker.sinks["stream"]
        self.sending = asyncio.Event()
        self.unblock = asyncio.Event()
        worker.sinks["stream"] = worker.dispatcher._sinks["stream"] = self

    async def send(self, alert: Alert) -> SendResult:
        self.sending.set()
        await self.unblock.wait()
        return await self._inner.send(alert)

    async def close(self) -> None:
        return None


QUIET = at(110 + 300 + 60 + 1)
"""Event time past ``storm()``'s quiet end by the grace: the storm resolves."""


@pytest.mark.parametrize("settled_first", ["opening", "waiting resolution"])
async def test_a_resolution_follows_its_opening_sent_by_another_replica_at_once(
    redis: Redis, settled_first: str
) -> None:
    """One replica is sending an alert's opening when another claims its resolution, which
    must wait for it: the resolution goes out as soon as the opening is delivered, with no
    further batch, tick or clock change (it used to wait until the first replica's claim
    ran out: 70 s at default settings). Whichever of the two settles first."""
    clock = Clock(at(3600))
    sending, waiting = handler("rejections", redis, clock), handler("rejections", redis, clock)
    held = HeldStreamSink(sending)
    await feed([sending], storm(), shard="s0")
    await sending.tick(OPENED)  # the opening is claimed here and held in the stream sink
    await asyncio.wait_for(held.sending.wait(), 5)
    if settled_first == "opening":
        await waiting.tick(QUIET)  # resolves; its resolution is claimed there and waits
        await asyncio.wait_for(waiting.flush(), 5)
        assert await stream_alerts(redis) == []
        held.unblock.set()
    else:
        looked = waiting.outbox.undelivered_among

        async def opening_delivered_after_the_look(entries: Any) -> Any:
            waiting.outbox.undelivered_among = looked  # type: ignore[method-assign]
            found = await looked(entries)
            assert found  # the opening is pending: the resolution waits
            delivered = asyncio.Event()
            settle = sending.outbox.settle

            async def settling(*args: Any) -> Any:
                try:
                    return await settle(*args)
                finally:
                    delivered.set()

            sending.outbox.settle = settling  # type: ignore[method-assign]
            held.unblock.set()
            await asyncio.wait_for(delivered.wait(), 5)
            sending.outbox.settle = settle  # type: ignore[method-assign]
            return found

        waiting.outbox.undelivered_among = opening_delivered_after_the_look  # type: ignore[method-assign]
        await waiting.tick(QUIET)
    await asyncio.wait_for(asyncio.gather(sending.flush(), waiting.flush()), 5)
    assert [a["status"] for a in await stream_alerts(redis)] == ["open", "resolved"]
    assert await sending.outbox.pending() == 0
    await close_all([sending, waiting])
