"""The outbox and dispatcher: claims, crashes between claim and delivery, round trips."""

from __future__ import annotations

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
    handler,
    settings,
    stream_alerts,
    webhook_settings,
)
from redis.asyncio import Redis

from worker.alerts.dispatch import Dispatcher, RetryPolicy
from worker.alerts.episodes import Subjects
from worker.alerts.model import Alert
from worker.alerts.outbox import Outcome, Settlement
from worker.alerts.sinks import SendResult
from worker.handlers.base import Batch
from worker.records import ConnectionEvent


class CountingRedis(Redis):
    """A client that counts the commands it sends (each one is a round trip)."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return await super().execute_command(*args, **options)


def storm(seq0: int = 0, start: float = 0) -> list[ConnectionEvent]:
    return [event("attachment.rejected", seq0 + i, start + i * 10) for i in range(12)]


async def test_each_batch_costs_one_redis_round_trip_per_handler(redis_url: str) -> None:
    """Handling a batch costs one EVALSHA per handler; a delivery round one more, off the
    batch path."""
    client = CountingRedis.from_url(redis_url)
    client.sent = []
    handlers = [handler(n, client, Clock(at(3600))) for n in ("rejections", "attach_loops")]
    quiet = [event("data-session.updated", i, i) for i in range(50)]
    await feed(handlers, [*quiet, *storm(300, 2000)])  # loads both scripts (once per process)
    await handlers[0].flush()
    client.sent.clear()
    for n in range(5):
        await feed(handlers, [event("data-session.started", 100 + n, 100 + n), *quiet])
    assert client.sent == ["EVALSHA"] * 10
    await handlers[1].flush()
    client.sent.clear()
    await feed(handlers[:1], storm(200, 3000))
    assert client.sent == ["EVALSHA"]
    await handlers[0].flush()
    # The round's settle; resolutions whose opening went out in an earlier round check it
    # is no longer pending (HEXISTS, pipelined: one round trip per round).
    assert [sent for sent in client.sent if sent != "HEXISTS"] == ["EVALSHA"] * 2
    await close_all(handlers)
    await client.aclose()


async def test_claim_of_a_crashed_worker_is_delivered_by_another_once(redis: Redis) -> None:
    """A dead worker's claimed alerts are delivered by another after the lease, once, even if it settles late."""
    clock = Clock(at(3600))
    crashed = handler("rejections", redis, clock)
    subjects = Subjects()
    crashed.collect(storm(), subjects)
    applied = await crashed.store.apply(subjects, now_ms=round(clock() * 1000), shard="s0")
    assert len(applied.claimed) == 2  # log and stream entries of the open alert
    assert await stream_alerts(redis) == []

    survivor = handler("rejections", redis, clock)
    await survivor.tick(at(120))
    await survivor.flush()
    assert await stream_alerts(redis) == []  # still leased to the crashed worker
    clock.advance(settings().webhook.round_seconds + 11)
    await survivor.tick(at(120))
    await survivor.flush()
    (alert,) = await stream_alerts(redis)

    late = [
        Settlement(c.entry, Outcome.DONE, stream_fields=("id", alert["id"]))
        for c in applied.claimed
    ]
    assert await crashed.outbox.settle(late, now_ms=0) == (0, 0, 0, 0)
    assert len(await redis.xrange(STREAM)) == 1
    await close_all([crashed, survivor])


async def test_entries_of_a_sink_no_longer_enabled_are_dead_lettered(redis: Redis) -> None:
    """Alerts waiting for a sink that was switched off are dead-lettered with the reason."""
    clock = Clock(at(3600))
    down = f"http://{servers.HOST}:{servers.free_port()}/alerts"
    before = handler("rejections", redis, clock, webhook_settings(down, attempts=1))
    await feed([before], storm())
    await before.flush()
    assert await before.outbox.pending() == 1
    after = handler("rejections", redis, clock, settings())
    clock.advance(3600)
    await after.tick(at(120))
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
    applied = await worker.store.apply(subjects, now_ms=round(clock() * 1000), shard="s0")
    dispatcher = Dispatcher(
        outbox=worker.outbox,
        sinks={"log": BrokenSink()},
        render=worker.render,
        retry=RetryPolicy(*(settings().webhook.retry_base,) * 2, settings().webhook.max_age),
        clock=clock,
    )
    dispatcher.submit(applied.claimed)
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
