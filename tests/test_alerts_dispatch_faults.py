"""The alert dispatcher under faults: a Redis error mid-round, a stalled process, a delivery
task that died, and a round filled from two claims. Each case sent a webhook POST twice (or
held a round bigger than its lease is sized for) before the dispatcher's fixes."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from alerts_support import (
    Clock,
    at,
    close_all,
    event,
    feed,
    handler,
    hook_server,
    webhook_settings,
)
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from worker.handlers.alerts.dispatch import Dispatcher
from worker.handlers.alerts.episodes import Subjects
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.model import Alert, to_ms
from worker.handlers.alerts.outbox import Outcome, Settlement
from worker.handlers.alerts.sinks import DELIVERED, SendResult
from worker.handlers.alerts.webhook import IDEMPOTENCY_HEADER
from worker.handlers.base import Batch

OPENED = at(110 + 60)


def storms(sims: int) -> list:  # type: ignore[type-arg]
    return [
        event("attachment.rejected", n * 100 + i, i * 10, sim=f"HS{n:032x}")
        for n in range(sims)
        for i in range(12)
    ]


def replicas_whose_first_cannot_read_ages(
    redis: Redis, clock: Clock, url: str
) -> tuple[AlertHandler, AlertHandler, Callable[[], None]]:
    """Two replicas with a webhook that tries once; the first one's age check of a failed
    alert (``requeued_at``) meets a Redis error until the returned function is called."""
    settings = webhook_settings(url, attempts=1)
    first = handler("rejections", redis, clock, settings)
    second = handler("rejections", redis, clock, settings)
    real = first.outbox.requeued_at

    async def failing(entry: str) -> int:
        raise RedisConnectionError("Connection reset by peer (Redis restarting)")

    def restore() -> None:
        first.outbox.requeued_at = real  # type: ignore[method-assign]

    first.outbox.requeued_at = failing  # type: ignore[method-assign]
    return first, second, restore


class SlowRemote:
    """A remote sink: each send takes ``seconds``; ``active`` counts the sends under way."""

    name = "webhook"
    remote = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.active = 0

    async def send(self, alert: Alert) -> SendResult:
        self.active += 1
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.active -= 1
        return DELIVERED

    async def close(self) -> None:
        return None


async def test_no_round_holds_more_than_concurrency_entries(redis: Redis) -> None:
    """Two concurrent batches of one handler (two shards): the first holds the reservation
    while its script runs, the second finds the dispatcher busy and asks for a claim. The
    asked claim waits for the reservation and the first batch's claim is queued: the task
    then claims only the room left, so no round holds more than concurrency (8) entries,
    what the lease (2 * round_seconds + 10 s) is sized for (it claimed a full round more,
    16 in one round, before)."""
    clock = Clock(at(3600))
    settings = webhook_settings("http://127.0.0.1:9/hook")
    filler = handler("rejections", redis, clock, settings)
    # 20 open storms, 60 outbox entries (log, stream, webhook), none claimed yet.
    subjects = Subjects()
    filler.collect(storms(20), subjects)
    now = round(clock() * 1000)
    await filler.store.apply(subjects, now_ms=now, shard="s0", newest_ms=to_ms(at(110)))
    await filler.store.apply(Subjects(), now_ms=now, tick_ms=to_ms(OPENED))
    assert await filler.outbox.pending() == 60

    worker = handler("rejections", redis, clock, settings)
    sink = SlowRemote(0.3)
    worker.sinks["webhook"] = worker.dispatcher._sinks["webhook"] = sink
    sizes: list[int] = []
    deliver = worker.dispatcher._deliver

    async def recording(entries: Any) -> int:
        sizes.append(len(entries))
        return await deliver(entries)

    worker.dispatcher._deliver = recording  # type: ignore[method-assign]
    # Batch A's script is slower than batch B's (a bigger batch): B releases first.
    apply = worker.store.apply
    calls = 0

    async def slow_first(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.2)
        return await apply(*args, **kwargs)

    worker.store.apply = slow_first  # type: ignore[method-assign]
    quiet = [
        event("attachment.rejected", 9_000_000 + i, 100 + i, sim="HS" + "e" * 32) for i in range(2)
    ]
    await asyncio.gather(
        worker.handle(Batch("shard-a", quiet[:1])), worker.handle(Batch("shard-b", quiet[1:]))
    )
    await asyncio.wait_for(worker.flush(), 20)
    await close_all([worker, filler])
    assert max(sizes) <= 8, f"a round of {max(sizes)} entries (concurrency 8)"


async def test_a_redis_error_in_a_round_leaves_its_other_sends_alone(redis: Redis) -> None:
    """A retriable webhook failure whose age check (``requeued_at``) meets a Redis error
    (Redis restarting) leaves the rest of the round alone: the sibling POST in flight is not
    cut short, the round is settled, and the task lives on. Before, the error escaped, the
    sibling send was cancelled after the receiver accepted it, the task died, and after the
    lease another replica POSTed the sibling alert again."""
    posts: Counter[str] = Counter()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        key = request.headers[IDEMPOTENCY_HEADER]
        if "HS" + "a" * 32 in (await request.text()):
            return web.Response(status=503)
        await asyncio.sleep(0.5)
        posts[key] += 1
        return web.Response(status=200)

    clock = Clock(at(3600))
    async with hook_server(answer) as url:
        first, second, restore = replicas_whose_first_cannot_read_ages(redis, clock, url)
        evs = [event("attachment.rejected", i, i * 10, sim="HS" + "a" * 32) for i in range(12)] + [
            event("attachment.rejected", 100 + i, i * 10, sim="HS" + "b" * 32) for i in range(12)
        ]
        await feed([first], evs, shard="s0")
        await first.tick(OPENED)
        task_error = None
        try:
            await asyncio.wait_for(first.flush(), 10)  # the round, settled
        except RuntimeError as exc:
            task_error = exc
        restore()
        # The lease runs out; another replica delivers what is left.
        clock.advance(3600)
        await second.tick(OPENED)
        await asyncio.wait_for(second.flush(), 10)
        await close_all([first, second])
    assert task_error is None, "the dispatcher task died on a RedisError"
    assert posts, "storm B's opening was never accepted"
    assert all(count == 1 for count in posts.values()), dict(posts)


async def test_alerts_are_posted_once_after_a_redis_error_in_a_round(
    redis: Redis,
) -> None:
    """The scenario of a delivery task that died on the Redis error above (before that was
    handled): the next tick claimed a round that sat queued with no task until the next
    batch, after its lease, while another replica delivered it; then this replica POSTed it
    again. Now the task lives on, and entries are sent only while their claim runs."""
    posts: Counter[str] = Counter()
    fail_a = True

    async def answer(request: web.Request) -> web.Response:
        body = await request.text()
        if fail_a and "HS" + "a" * 32 in body:
            return web.Response(status=503)
        posts[request.headers[IDEMPOTENCY_HEADER]] += 1
        return web.Response(status=200)

    clock = Clock(at(3600))
    async with hook_server(answer) as url:
        first, second, restore = replicas_whose_first_cannot_read_ages(redis, clock, url)
        storm_a = [event("attachment.rejected", i, i * 10) for i in range(12)]
        storm_b = [
            event("attachment.rejected", 500 + i, 200 + i * 10, sim="HS" + "b" * 32)
            for i in range(12)
        ]
        await feed([first], storm_a + storm_b, shard="s0")
        await first.tick(OPENED)  # storm A opens; its round meets the Redis error
        with contextlib.suppress(RuntimeError):  # the old code's task died of it
            await asyncio.wait_for(first.flush(), 10)
        restore()
        fail_a = False
        with contextlib.suppress(RuntimeError):
            await first.tick(at(200 + 110 + 60))  # storm B opens
        # No batch or tick on the first replica for longer than the lease; the second
        # replica delivers what is due.
        clock.advance(3600)
        await second.tick(at(200 + 110 + 60))
        await asyncio.wait_for(second.flush(), 10)
        # Then the first replica gets a batch (or a tick) again.
        await first.tick(at(200 + 110 + 60))
        await asyncio.wait_for(first.flush(), 10)
        await close_all([first, second])
    assert posts, "nothing was accepted"
    assert all(count == 1 for count in posts.values()), dict(posts)


async def test_an_entry_whose_claim_ran_out_before_its_send_is_not_sent(redis: Redis) -> None:
    """A replica stalls between claiming a round and sending it (a paused process, a busy
    loop) until the claims ran out; another replica claims and delivers them meanwhile.
    The first one, going on, finds each claim too close to its end to send, hands the entry
    back (its settlement is stale: ignored) and sends nothing: every alert is POSTed once.
    Before, it POSTed them all a second time."""
    posts: Counter[str] = Counter()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        posts[request.headers[IDEMPOTENCY_HEADER]] += 1
        return web.Response(status=200)

    clock = Clock(at(3600))
    async with hook_server(answer) as url:
        settings = webhook_settings(url)
        first = handler("rejections", redis, clock, settings)
        second = handler("rejections", redis, clock, settings)
        looked = first.outbox.undelivered_among
        stalled = False

        async def stalling(entries: Any) -> Any:
            nonlocal stalled
            if not stalled:  # the first round: stall past its claims' end
                stalled = True
                clock.advance(3600)
                await second.tick(OPENED)
                await asyncio.wait_for(second.flush(), 10)
            return await looked(entries)

        first.outbox.undelivered_among = stalling  # type: ignore[method-assign]
        await feed([first], storms(3), shard="s0")
        await first.tick(OPENED)
        await asyncio.wait_for(first.flush(), 10)
        await close_all([first, second])
    assert stalled
    assert len(posts) == 3, dict(posts)  # three storms opened, each POSTed
    assert all(count == 1 for count in posts.values()), dict(posts)


async def test_a_dead_delivery_task_is_started_again(redis: Redis) -> None:
    """A bug kills the delivery task mid-round: the next batch or tick claims the entries
    again once their claims ran out, starts a new task that delivers them, and raises the
    bug once. Before, the dead task stayed in place, so what that batch claimed sat queued
    with no task until a later batch, possibly after its claim."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    looked = worker.outbox.undelivered_among
    broken = True

    async def buggy(entries: Any) -> Any:
        if broken:
            raise LookupError("a bug in a round")
        return await looked(entries)

    worker.outbox.undelivered_among = buggy  # type: ignore[method-assign]
    await feed([worker], storms(1), shard="s0")
    await worker.tick(OPENED)  # claims the opening's entries: the round fails
    for _ in range(100):
        task = worker.dispatcher._task
        if task is None or task.done():
            break
        await asyncio.sleep(0.01)
    broken = False
    clock.advance(3600)  # the failed round's claims run out
    with pytest.raises(RuntimeError, match="alert dispatcher failed") as raised:
        await worker.tick(OPENED)  # claims them again, and starts a new task
    assert "a bug in a round" in str(raised.value.__cause__)
    await asyncio.wait_for(worker.flush(), 10)
    assert await worker.outbox.pending() == 0
    await close_all([worker])


async def test_entries_claimed_again_by_their_round_stay_counted_as_queued(redis: Redis) -> None:
    """A stalled round hands its entries back and its own claim takes them again: while
    they are queued or in flight, this replica grants no other claim (before, the round
    forgot them once it ended, so a batch could claim a second round beside them)."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock, webhook_settings("http://127.0.0.1:9/hook"))
    sink = SlowRemote(0.5)
    worker.sinks["webhook"] = worker.dispatcher._sinks["webhook"] = sink
    looked = worker.outbox.undelivered_among
    stalled = False

    async def stalling(entries: Any) -> Any:
        nonlocal stalled
        if not stalled:
            stalled = True
            clock.advance(3600)  # past the claims' end: every entry is handed back
        return await looked(entries)

    worker.outbox.undelivered_among = stalling  # type: ignore[method-assign]
    await feed([worker], storms(2), shard="s0")
    await worker.tick(OPENED)
    for _ in range(1000):  # the round that claimed them again, sending
        if sink.active:
            break
        await asyncio.sleep(0.01)
    assert sink.active, "the handed-back entries were not sent"
    limit = worker.dispatcher.reserve()  # no await since the sends were seen in flight
    worker.dispatcher.release([], limit)
    await asyncio.wait_for(worker.flush(), 20)
    await close_all([worker])
    assert limit == 0


async def test_closing_with_a_dead_task_does_not_wait_out_the_grace(redis: Redis) -> None:
    """The delivery task died with a claim asked for in its queue, and nothing reaped it
    before the shutdown: ``close`` does not wait its grace (5 s) for a task that is gone."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    go = asyncio.Event()

    async def buggy(entries: Any) -> Any:
        await go.wait()
        raise LookupError("a bug in a round")

    worker.outbox.undelivered_among = buggy  # type: ignore[method-assign]
    await feed([worker], storms(1), shard="s0")
    await worker.tick(OPENED)  # the round starts, and waits
    await worker.tick(OPENED)  # busy: asks for a claim
    task = worker.dispatcher._task
    assert task is not None
    go.set()
    await asyncio.wait([task])
    assert worker.dispatcher._queue.qsize() == 1  # the ask, with no task to take it
    # A grace of an hour: waited out, this takes the test's 60 s bound (it did before).
    await asyncio.wait_for(worker.dispatcher.close(grace=3600), 60)
    await close_all([worker])


async def test_an_opening_handed_back_is_not_marked_waiting(redis: Redis) -> None:
    """``P:wait`` marks resolutions waiting for their opening; an opening handed back
    (its claim running out) is only due again."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    await feed([worker], storms(1), shard="s0")
    await worker.store.apply(Subjects(), now_ms=round(clock() * 1000), tick_ms=to_ms(OPENED))
    claimed = await worker.outbox.claim(round(clock() * 1000), 8, 60_000)
    opening = next(entry for entry in claimed if entry.entry.endswith("|open"))
    now = round(clock() * 1000)
    wait = Settlement(opening.entry, Outcome.WAIT, opening.fence, due_ms=now)
    await worker.outbox.settle([wait], now)
    marked = await redis.hexists(f"{worker._prefix}:wait", opening.entry)  # type: ignore[misc]
    due = await redis.zscore(f"{worker._prefix}:due", opening.entry)
    await close_all([worker])
    assert not marked
    assert due == now


def test_a_lease_shorter_than_two_sends_is_refused() -> None:
    """A fresh claim of a resolution that waits one send for its opening could be handed
    back and claimed again without end."""
    with pytest.raises(ValueError, match="must be at least twice a send's bound"):
        Dispatcher(
            outbox=None,  # type: ignore[arg-type]
            sinks={},
            render=lambda transition: None,  # type: ignore[arg-type,return-value]
            retry=None,  # type: ignore[arg-type]
            lease_ms=69_999,
            send_ms=30_000,
        )


async def test_flush_after_a_dead_task_delivers_what_it_left(redis: Redis) -> None:
    """The task died with a claim asked for in its queue: the first ``flush`` raises the
    error, the next one starts a task and waits for what was left (it returned at once)."""
    clock = Clock(at(3600))
    worker = handler("rejections", redis, clock)
    looked = worker.outbox.undelivered_among
    go = asyncio.Event()
    broken = True

    async def buggy(entries: Any) -> Any:
        if broken:
            await go.wait()
            raise LookupError("a bug in a round")
        return await looked(entries)

    worker.outbox.undelivered_among = buggy  # type: ignore[method-assign]
    await feed([worker], storms(1), shard="s0")
    await worker.tick(OPENED)  # the round starts, and waits
    await worker.tick(OPENED)  # busy: asks for a claim
    go.set()
    with pytest.raises(RuntimeError, match="alert dispatcher failed"):
        await asyncio.wait_for(worker.flush(), 10)
    broken = False
    clock.advance(3600)  # the failed round's claims run out
    await asyncio.wait_for(worker.flush(), 10)
    assert await worker.outbox.pending() == 0
    await close_all([worker])


def test_the_lease_fits_any_webhook_timing(redis: Redis) -> None:
    """The lease is built from the same rounded send bound the dispatcher checks: a timing
    whose bound does not round evenly (7,000.6 ms here) still starts."""
    settings = webhook_settings("http://127.0.0.1:9/hook", timeout=2.0006, attempts=1)
    settings = settings.model_copy(
        update={
            "webhook": settings.webhook.model_copy(update={"backoff_cap": timedelta(seconds=5)})
        }
    )
    assert settings.webhook.round_seconds == pytest.approx(7.0006)
    handler("rejections", redis, Clock(at(3600)), settings)
