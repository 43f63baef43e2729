"""Delivery order and claims: no sink gets a resolution before (or without) its opening,
late settlements of a claim that ran out are ignored, a closing dispatcher claims nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web
from alerts_support import (
    PREFIX,
    STREAM,
    Clock,
    at,
    close_all,
    event,
    feed,
    handler,
    hook_server,
    stream_alerts,
    webhook_settings,
)
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker.events.records import ConnectionEvent
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.model import Alert
from worker.handlers.alerts.outbox import ORPHANED, Outbox, Outcome, Settlement
from worker.handlers.alerts.sinks import SendResult

OPENED = at(110 + 60)
"""Event time past ``storm()``'s last rejection by the grace: the storm is open."""
QUIET = at(110 + 300 + 60 + 1)
"""Event time past ``storm()``'s quiet end by the grace: the storm resolves."""


def storm() -> list[ConnectionEvent]:
    return [event("attachment.rejected", i, i * 10) for i in range(12)]


class StreamSink:
    """The stream sink of ``worker``: holds each send until ``unblock`` is set, gives an
    opening up as hopeless while ``fail_open``, never answers a resolution while
    ``hang_resolved``."""

    name = "stream"
    remote = False

    def __init__(self, worker: AlertHandler, *, held: bool = True) -> None:
        self._inner = worker.sinks["stream"]
        self.sending = asyncio.Event()
        self.unblock = asyncio.Event()
        if not held:
            self.unblock.set()
        self.fail_open = False
        self.hang_resolved = False
        worker.sinks["stream"] = worker.dispatcher._sinks["stream"] = self

    async def send(self, alert: Alert) -> SendResult:
        self.sending.set()
        await self.unblock.wait()
        if self.hang_resolved and alert.status.value == "resolved":
            await asyncio.Event().wait()
        if self.fail_open and alert.status.value == "open":
            return SendResult(delivered=False, retriable=False, reason="HTTP 400")
        return await self._inner.send(alert)

    async def close(self) -> None:
        return None


def by_status(dead: dict[str, dict[str, Any]], sink: str) -> dict[str, str]:
    """The dead entries of ``sink``: status -> reason."""
    return {
        entry.rsplit("|", 1)[1]: letter["reason"]
        for entry, letter in dead.items()
        if entry.startswith(f"{sink}|")
    }


@pytest.mark.parametrize(
    "resolution", ["waiting on another replica", "written after", "claimed with it"]
)
async def test_a_resolution_is_given_up_with_its_opening_and_redriven_after_it(
    redis: Redis, resolution: str
) -> None:
    """When a sink gives an opening up as hopeless, its resolution is not sent but given up
    with it, whether it waited for the opening on another replica, was written later, or
    was claimed in the same round; redriving the opening brings the resolution back, and
    the sink gets the opening, then the resolution (it used to get the resolution at once,
    and the opening only after the redrive)."""
    clock = Clock(at(3600))
    first, second = handler("rejections", redis, clock), handler("rejections", redis, clock)
    sink = StreamSink(first, held=resolution == "waiting on another replica")
    sink.fail_open = True
    await feed([first], storm(), shard="s0")
    if resolution == "claimed with it":
        await first.tick(QUIET)  # opens and resolves in one step: both claimed together
        await asyncio.wait_for(first.flush(), 5)
    else:
        await first.tick(OPENED)
        await asyncio.wait_for(sink.sending.wait(), 5)
        if resolution == "waiting on another replica":
            await second.tick(QUIET)  # claims the resolution, which waits for the opening
            await asyncio.wait_for(second.flush(), 5)
            sink.unblock.set()
            await asyncio.wait_for(first.flush(), 5)
        else:
            await asyncio.wait_for(first.flush(), 5)
            await first.tick(QUIET)
        await asyncio.wait_for(asyncio.gather(first.flush(), second.flush()), 5)
    assert await stream_alerts(redis) == []
    dead = await first.outbox.dead()
    assert by_status(dead, "stream") == {"open": "HTTP 400", "resolved": ORPHANED}
    assert by_status(dead, "log") == {}  # the log sink got both, in order
    assert await first.outbox.pending() == 0

    sink.fail_open = False
    (opening,) = [e for e in dead if e.startswith("stream|") and e.endswith("|open")]
    assert await first.outbox.requeue([opening], round(clock() * 1000)) == 1
    assert await first.outbox.dead() == {}  # the resolution came back with its opening
    await first.tick(QUIET)
    await asyncio.wait_for(first.flush(), 5)
    assert [a["status"] for a in await stream_alerts(redis)] == ["open", "resolved"]
    assert await first.outbox.pending() == 0
    await close_all([first, second])


async def test_a_resolution_redriven_alone_waits_for_its_opening(redis: Redis) -> None:
    """A resolution redriven while its opening is still given up goes back to the dead
    store, unsent, and that is logged."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    sink = StreamSink(worker, held=False)
    sink.fail_open = True
    await feed([worker], storm(), shard="s0")
    await worker.tick(QUIET)
    await asyncio.wait_for(worker.flush(), 5)
    dead = await worker.outbox.dead()
    (resolution,) = [e for e in dead if e.startswith("stream|") and e.endswith("|resolved")]
    assert await worker.outbox.requeue([resolution], round(clock() * 1000)) == 1
    with capture_logs() as logs:
        await worker.tick(QUIET)
        await asyncio.wait_for(worker.flush(), 5)
    assert {
        "event": "alert_delivery_dead",
        "entry": resolution,
        "reason": ORPHANED,
        "log_level": "error",
    } in logs
    assert await stream_alerts(redis) == []
    assert by_status(await worker.outbox.dead(), "stream") == {
        "open": "HTTP 400",
        "resolved": ORPHANED,
    }
    await close_all([worker])


@pytest.mark.parametrize("resolution", ["written after", "claimed with it"])
async def test_a_webhook_resolution_is_given_up_with_its_opening(
    redis: Redis, resolution: str
) -> None:
    """A receiver that refuses an opening (4xx) is never sent its resolution; after a
    redrive it gets the opening, then the resolution."""
    received: list[str] = []
    refuse = True

    async def answer(request: web.Request) -> web.Response:
        status = orjson.loads(await request.read())["status"]
        if refuse and status == "open":
            return web.Response(status=400)
        received.append(status)
        return web.Response(status=200)

    clock = Clock(at(3600))
    async with hook_server(answer) as url:
        worker = handler("rejections", redis, clock, webhook_settings(url, attempts=1))
        await feed([worker], storm(), shard="s0")
        if resolution == "written after":
            await worker.tick(OPENED)
            await asyncio.wait_for(worker.flush(), 5)
        await worker.tick(QUIET)
        await asyncio.wait_for(worker.flush(), 5)
        assert received == []
        assert by_status(await worker.outbox.dead(), "webhook") == {
            "open": "HTTP 400",
            "resolved": ORPHANED,
        }
        refuse = False
        await worker.outbox.requeue(list(await worker.outbox.dead()), round(clock() * 1000))
        await worker.tick(QUIET)
        await asyncio.wait_for(worker.flush(), 5)
        assert received == ["open", "resolved"]
        assert await worker.outbox.pending() == 0
        await close_all([worker])


async def test_a_late_settlement_of_a_claim_that_ran_out_is_ignored(redis: Redis) -> None:
    """A replica whose claim ran out and was taken by another settles late: its results
    are ignored (stale), so they neither shorten the new claim (which would let a third
    replica send the entry while the second still does) nor settle what that one owns."""
    outbox = Outbox(redis, f"{PREFIX}:alerts:fenced", STREAM, 100)
    opening, resolution = "webhook|k|s|1|open", "webhook|k|s|1|resolved"
    lease = 70_000
    await redis.hset(f"{PREFIX}:alerts:fenced:outbox", mapping={opening: "{}", resolution: "{}"})
    await redis.zadd(f"{PREFIX}:alerts:fenced:due", {opening: 0, resolution: 0})
    (a,) = await outbox.claim(0, 1, lease)  # replica A: the opening
    (b,) = await outbox.claim(1, 1, lease)  # replica B: the resolution; then B stalls
    assert (a.entry, b.entry) == (opening, resolution)
    c = {entry.entry: entry for entry in await outbox.claim(lease + 2, 8, lease)}
    assert set(c) == {opening, resolution}  # replica C, once both claims ran out

    # B looked while the opening was pending: its late "wait" must not touch C's claim.
    late = await outbox.settle([Settlement(resolution, Outcome.WAIT, b.fence, due_ms=1)], lease + 3)
    assert late.stale == (resolution,)
    assert await redis.zscore(f"{PREFIX}:alerts:fenced:due", resolution) == c[resolution].fence
    assert await redis.hgetall(f"{PREFIX}:alerts:fenced:wait") == {}
    late = await outbox.settle([Settlement(opening, Outcome.DONE, a.fence)], lease + 4)
    assert (late.done, late.stale) == (0, (opening,))
    assert await outbox.claim(lease + 5, 8, lease) == []  # nothing while C's claims hold

    settled = await outbox.settle(
        [
            Settlement(opening, Outcome.DONE, c[opening].fence),
            Settlement(resolution, Outcome.DONE, c[resolution].fence),
        ],
        lease + 6,
    )
    assert (settled.done, settled.stale) == (2, ())
    assert await outbox.pending() == 0


async def test_a_round_settles_an_opening_before_its_resolution_claimed_before_it(
    redis: Redis,
) -> None:
    """An opening whose claim ran out (its replica died) is claimed again with its
    resolution, which was written meanwhile and is due earlier: the stream still gets the
    opening first (it used to get the resolution first)."""
    clock = Clock(at(3600))
    dying = handler("rejections", redis, clock)
    sink = StreamSink(dying)
    await feed([dying], storm(), shard="s0")
    await dying.tick(OPENED)  # the opening is claimed and held in the sink
    await asyncio.wait_for(sink.sending.wait(), 5)
    await dying.tick(QUIET)  # the resolution is written; the dispatcher is busy
    task = dying.dispatcher._task
    assert task is not None
    task.cancel()  # the replica dies: nothing is settled
    with pytest.raises(asyncio.CancelledError):
        await task
    dying.dispatcher._task = None
    clock.advance(3600)  # past the claim's lease
    survivor = handler("rejections", redis, clock)
    await survivor.tick(QUIET)
    await asyncio.wait_for(survivor.flush(), 5)
    assert [a["status"] for a in await stream_alerts(redis)] == ["open", "resolved"]
    await close_all([survivor])


async def test_a_closing_dispatcher_claims_nothing(redis: Redis) -> None:
    """A round that ends while its dispatcher closes does not claim the next one (which
    would stay claimed for a whole lease once the grace ran out): another replica delivers
    it at once."""
    clock = Clock(at(3600))
    closing = handler("rejections", redis, clock)
    sink = StreamSink(closing)
    sink.hang_resolved = True
    await feed([closing], storm(), shard="s0")
    await closing.tick(OPENED)  # the opening is claimed and held in the sink
    await asyncio.wait_for(sink.sending.wait(), 5)
    await closing.tick(QUIET)  # the resolution is written; a claim is asked for
    stopping = asyncio.create_task(closing.dispatcher.close(grace=0.5))
    await asyncio.sleep(0)  # close has begun
    sink.unblock.set()  # the round ends during the close
    await asyncio.wait_for(stopping, 5)
    other = handler("rejections", redis, clock)
    await other.tick(QUIET)
    await asyncio.wait_for(other.flush(), 5)
    assert [a["status"] for a in await stream_alerts(redis)] == ["open", "resolved"]
    await close_all([closing, other])
