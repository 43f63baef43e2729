"""The webhook sink against a real aiohttp receiver: signatures, retries, outages, dead letters."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import orjson
import pytest
import servers
from aiohttp import web
from alerts_support import (
    NOISY,
    SECRET,
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
    hook_server,
    sim_end,
    simulated,
    stream_alerts,
    webhook_settings,
)
from redis.asyncio import Redis
from structlog.testing import capture_logs

from worker.cli.main import main
from worker.events.records import ConnectionEvent
from worker.handlers.alerts.dispatch import RetryPolicy
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.webhook import (
    ALERT_ID_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
    verify,
)


def storm(seq0: int = 0) -> list[ConnectionEvent]:
    return [event("attachment.rejected", seq0 + i, i * 10) for i in range(12)]


async def test_receiver_verifies_each_signed_alert(redis: Redis, receiver: Receiver) -> None:
    """An alert arrives as one signed POST whose body is the stream's alert, keyed by its delivery key."""
    handlers = [handler("rejections", redis, Clock(at(3600)), webhook_settings(receiver.url))]
    await feed(handlers, storm())
    await finish(handlers, at(180))
    (alert,) = await stream_alerts(redis)
    key = f"{alert['id']}:open"
    assert list(receiver.accepted) == [key]
    assert receiver.accepted[key] == alert
    assert receiver.headers[key][ALERT_ID_HEADER] == alert["id"]
    assert receiver.headers[key]["Content-Type"] == "application/json"
    assert (receiver.requests, receiver.bad_signatures) == (1, 0)
    await close_all(handlers)


def test_signature_check_rejects_tampering_wrong_keys_and_old_requests() -> None:
    """``verify`` accepts the signed body only: not another body, key or a stale timestamp."""
    body, now = b'{"id":"x"}', 1_700_000_000
    header = sign(SECRET, now, body)
    assert header.startswith("v1=")
    assert verify(SECRET, body, timestamp=str(now), signature=header, now=now + 10)
    assert not verify(SECRET, body + b" ", timestamp=str(now), signature=header, now=now)
    assert not verify("other", body, timestamp=str(now), signature=header, now=now)
    assert not verify(SECRET, body, timestamp=str(now), signature=header, now=now + 301)
    assert not verify(SECRET, body, timestamp="soon", signature=header, now=now)
    assert not verify(SECRET, body, timestamp=None, signature=header, now=now)


async def test_server_errors_and_timeouts_are_retried_in_the_same_round(
    redis: Redis, receiver: Receiver
) -> None:
    """503s and a timeout are retried with backoff; the alert is accepted once."""
    tuned = webhook_settings(receiver.url, timeout=0.3, attempts=4)
    handlers = [handler("rejections", redis, Clock(at(3600)), tuned)]
    receiver.fail_next = 2
    await feed(handlers, storm())
    await finish(handlers, at(180))
    assert (receiver.requests, len(receiver.accepted), receiver.repeats) == (3, 1, 0)
    receiver.delay = 1.0
    await feed(handlers, [event("attachment.accepted", 1, 200)])
    await finish(handlers, at(300))
    assert receiver.requests == 5
    assert sorted(k.rsplit(":", 1)[1] for k in receiver.accepted) == ["open", "resolved"]
    assert await handlers[0].outbox.pending() == 0
    await close_all(handlers)


async def deliver_pending(handlers: list[AlertHandler], clock: Clock) -> None:
    """Let retry delays pass and tick until nothing is pending."""
    for _ in range(20):
        clock.advance(3600)
        for item in handlers:
            await item.tick()
            await item.flush()
        if all([await item.outbox.pending() == 0 for item in handlers]):
            return
    raise AssertionError("deliveries still pending")


async def test_outage_then_recovery_delivers_each_alert_once(
    redis: Redis, receiver: Receiver
) -> None:
    """Alerts wait in the outbox during an outage and reach the receiver exactly once after it."""
    events, _ = simulated(**NOISY)
    end = sim_end(NOISY)
    clock = Clock(end)
    tuned = webhook_settings(receiver.url, attempts=2)
    handlers = [handler(name, redis, clock, tuned) for name in ("rejections", "attach_loops")]
    receiver.status = 503
    await feed(handlers, events, batch_size=500)
    await finish(handlers, end + timedelta(hours=1))
    streamed = await stream_alerts(redis)
    assert len(streamed) > 100
    assert receiver.accepted == {}
    assert receiver.requests >= len(streamed)
    assert sum([await h.outbox.pending() for h in handlers]) >= len(streamed)
    receiver.status = 200
    await deliver_pending(handlers, clock)
    assert receiver.repeats == 0
    assert receiver.bad_signatures == 0
    assert receiver.accepted == {f"{a['id']}:{a['status']}": a for a in streamed}
    await close_all(handlers)


async def test_client_errors_are_dead_lettered_not_retried(
    redis: Redis, receiver: Receiver
) -> None:
    """A 4xx answer cannot succeed by repetition: the alert is kept in the dead letters."""
    handlers = [handler("rejections", redis, Clock(at(3600)), webhook_settings(receiver.url))]
    receiver.status = 422
    await feed(handlers, storm())
    await finish(handlers, at(180))
    dead = await handlers[0].outbox.dead()
    ((entry, letter),) = dead.items()
    assert entry.startswith("webhook|rejection_storm|")
    assert letter["reason"] == "HTTP 422"
    assert receiver.requests == 1
    assert await handlers[0].outbox.pending() == 0
    await close_all(handlers)


async def test_unreachable_receiver_keeps_the_alert_for_a_later_round(
    redis: Redis, closed_port: int
) -> None:
    """Connection errors are retriable: the alert stays pending with a later due time."""
    url = f"http://{servers.HOST}:{closed_port}/alerts"
    clock = Clock(at(3600))
    handlers = [handler("rejections", redis, clock, webhook_settings(url, attempts=2))]
    await feed(handlers, storm())
    await finish(handlers, at(180))
    assert await handlers[0].outbox.pending() == 1
    tries = f"{handlers[0].store.prefix}:tries"
    await handlers[0].tick(at(180))
    await handlers[0].flush()
    assert list((await redis.hgetall(tries)).values()) == [b"1"]
    clock.advance(2)
    await handlers[0].tick(at(180))
    await handlers[0].flush()
    assert list((await redis.hgetall(tries)).values()) == [b"2"]
    assert await handlers[0].outbox.pending() == 1
    await close_all(handlers)


def test_headers_carry_timestamp_signature_and_idempotency_key() -> None:
    """The header names receivers rely on stay stable."""
    assert (TIMESTAMP_HEADER, SIGNATURE_HEADER, IDEMPOTENCY_HEADER) == (
        "X-Supersim-Timestamp",
        "X-Supersim-Signature",
        "Idempotency-Key",
    )


async def test_full_dead_store_keeps_alerts_pending_and_the_alerts_commands_manage_it(
    redis: Redis,
    redis_url: str,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Beyond ``dead_maxlen`` a hopeless alert stays pending and is tried again later;
    `alerts dead` lists the dead ones, `alerts delete` discards them, `alerts redrive`
    sends them back for delivery."""
    clock = Clock(at(3600))
    tuned = webhook_settings(receiver.url, retry_cap=5.0).model_copy(update={"dead_maxlen": 1})
    rejections = handler("rejections", redis, clock, tuned)
    receiver.status = 422
    other = [event("attachment.rejected", 100 + i, i * 10, sim=SIM_B) for i in range(12)]
    await feed([rejections], storm() + other)
    await finish([rejections], at(180))
    assert (len(await rejections.outbox.dead()), await rejections.outbox.pending()) == (1, 1)

    monkeypatch.setenv("SUPERSIM_STREAM_NAME", "alerts-test")
    monkeypatch.setenv("SUPERSIM_CONSUMER_GROUP", "g")
    monkeypatch.setenv("SUPERSIM_REDIS_URL", redis_url)
    monkeypatch.setenv("SUPERSIM_HANDLERS", "log")  # the alerts commands see every alert handler
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["alerts", "dead", "--json"]) == 0
    (row,) = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["handler"], row["sink"], row["kind"]) == (
        "rejections",
        "webhook",
        "rejection_storm",
    )
    assert (row["status"], row["reason"]) == ("open", "HTTP 422")
    assert await asyncio.to_thread(main, ["alerts", "delete", row["entry"], "nope"]) == 1
    assert "deleted 1 of 2 entries" in capsys.readouterr().out

    clock.advance(10)  # the held alert is due again, and the dead store has room now
    await rejections.tick(at(180))
    await rejections.flush()
    assert (len(await rejections.outbox.dead()), await rejections.outbox.pending()) == (1, 0)
    receiver.status = 200
    assert await asyncio.to_thread(main, ["alerts", "redrive"]) == 0
    assert "requeued 1 alerts" in capsys.readouterr().out
    await rejections.tick(at(180))
    await rejections.flush()
    assert len(receiver.accepted) == 1
    assert (await rejections.outbox.dead(), await rejections.outbox.pending()) == ({}, 0)
    assert await asyncio.to_thread(main, ["alerts", "redrive", "nope"]) == 1
    assert await asyncio.to_thread(main, ["alerts", "dead"]) == 0
    assert "0 undeliverable alerts" in capsys.readouterr().out
    await rejections.close()


async def test_a_resolution_is_never_delivered_before_its_opening(
    redis: Redis, receiver: Receiver
) -> None:
    """The open alert's first delivery fails and is retried later; the episode resolves in
    the meantime. The resolution waits for the opening: the receiver sees open, then
    resolved, never a resolution of an alert it has not seen."""
    clock = Clock(at(3600))
    storm_handler = handler("rejections", redis, clock, webhook_settings(receiver.url, attempts=1))
    receiver.fail_next = 1
    await feed([storm_handler], [event("attachment.rejected", i, i * 10) for i in range(12)])
    await finish([storm_handler], at(180))
    await feed([storm_handler], [event("attachment.accepted", 1, 200)])
    await finish([storm_handler], at(400))
    assert list(receiver.accepted) == []  # the resolution waits for the opening's retry
    clock.advance(5)
    await finish([storm_handler], at(400))
    assert [key.rsplit(":", 1)[1] for key in receiver.accepted] == ["open", "resolved"]
    await close_all([storm_handler])


def test_retries_are_spread_with_jitter() -> None:
    """Alerts that failed together do not come due together: each next try is between
    half and all of the exponential delay."""
    policy = RetryPolicy(timedelta(seconds=30), timedelta(minutes=15), timedelta(days=1))
    dues = {policy.next_due(0, 1) for _ in range(50)}
    assert len(dues) > 40
    assert all(30_000 <= due <= 60_000 for due in dues)
    assert all(450_000 <= policy.next_due(0, 20) <= 900_000 for _ in range(20))


async def test_an_accepted_post_counts_whatever_the_answer_body_does(redis: Redis) -> None:
    """A receiver that answers 200 and then dribbles (or never ends) its body has accepted
    the alert: the status decides, the body is never read, nothing is posted again."""
    posts = 0

    async def dribble(request: web.Request) -> web.StreamResponse:
        nonlocal posts
        posts += 1
        await request.read()
        response = web.StreamResponse(status=200)
        response.content_length = 10_000_000
        await response.prepare(request)
        await response.write(b"{")
        await asyncio.sleep(3)  # longer than the client's 1 s timeout
        return response

    async with hook_server(dribble) as url:
        tuned = webhook_settings(url, timeout=timedelta(seconds=1))
        storm_handler = handler("rejections", redis, Clock(at(3600)), tuned)
        with capture_logs() as logs:
            await feed(
                [storm_handler], [event("attachment.rejected", i, i * 10) for i in range(12)]
            )
            await finish([storm_handler], at(180))
        await close_all([storm_handler])
    assert posts == 1
    assert not [line for line in logs if line["event"] == "webhook_attempt_failed"]
    assert await storm_handler.outbox.pending() == 0


async def test_a_shutdown_mid_round_keeps_what_was_delivered(redis: Redis) -> None:
    """Closing while one POST hangs: the alerts of the round already delivered are settled,
    so only the one in flight is delivered again later."""
    delivered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        if body["sim_sid"] == SIM_B:
            await asyncio.sleep(4)  # hangs past the close's grace
        delivered.append(body["sim_sid"])
        return web.Response(status=200)

    storms = [event("attachment.rejected", i, i * 10, sim=SIM_A) for i in range(10)]
    storms += [event("attachment.rejected", 100 + i, i * 10, sim=SIM_B) for i in range(10)]
    async with hook_server(hook) as url:
        tuned = webhook_settings(url, timeout=timedelta(seconds=10), attempts=1)
        storm_handler = handler("rejections", redis, Clock(at(3600)), tuned)
        await feed([storm_handler], storms)
        await storm_handler.tick(at(180))  # opens both storms; their round is not awaited
        await asyncio.sleep(1)
        assert delivered == [SIM_A]
        await storm_handler.dispatcher.close(grace=0.5)
        left = await redis.hkeys(f"{storm_handler.store.prefix}:outbox")
        await close_all([storm_handler])
    assert [entry.decode().split("|")[0] for entry in left] == ["webhook"]
    assert SIM_B in left[0].decode()


async def test_a_redriven_alert_gets_every_retry_round_again(
    redis: Redis, receiver: Receiver
) -> None:
    """An alert given up on for its age, then redriven, is not dead again at its first
    failure: its age counts from the redrive. The reason says it was too old."""
    clock = Clock(at(3600))
    tuned = webhook_settings(receiver.url, attempts=1, max_age=timedelta(seconds=60))
    storm_handler = handler("rejections", redis, clock, tuned)
    receiver.status = 503
    await feed([storm_handler], [event("attachment.rejected", i, i * 10) for i in range(10)])
    await finish([storm_handler], at(180))
    clock.advance(120)
    await storm_handler.tick(at(180))
    await storm_handler.flush()
    dead = await storm_handler.outbox.dead()
    assert len(dead) == 1
    assert "maximum age (last: HTTP 503)" in next(iter(dead.values()))["reason"]
    await storm_handler.outbox.requeue(list(dead), round(clock() * 1000))
    receiver.status = 200
    receiver.fail_next = 1  # the receiver is back, but one POST fails
    await storm_handler.tick(at(180))
    await storm_handler.flush()
    assert await storm_handler.outbox.dead() == {}
    clock.advance(40)
    await finish([storm_handler], at(180))
    assert [key.rsplit(":", 1)[1] for key in receiver.accepted] == ["open"]
    await close_all([storm_handler])
