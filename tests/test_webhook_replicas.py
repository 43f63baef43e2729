"""A slow webhook receiver and several replicas: no alert is POSTed twice, none is missed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from aiohttp import web
from alerts_support import (
    FLEET_A,
    at,
    close_all,
    event,
    handler,
    hook_server,
    webhook_settings,
)
from redis.asyncio import Redis

from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.webhook import IDEMPOTENCY_HEADER
from worker.handlers.base import Batch

SIMS = 200
POST_SECONDS = 0.8
REPLICAS = 3


def storms() -> list:  # type: ignore[type-arg]
    """One rejection storm (12 rejections in 110 s) for each of ``SIMS`` SIMs."""
    return [
        event(
            "attachment.rejected",
            sim_no * 100 + i,
            i * 10,
            sim=f"HS{sim_no:032x}",
            fleet=FLEET_A,
            error__code=83705,
        )
        for sim_no in range(SIMS)
        for i in range(12)
    ]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_slow_receiver_gets_each_alert_once_from_three_replicas(redis_url: str) -> None:
    """With a receiver taking 0.8 s per POST and a claim lease shorter than the backlog's
    delivery time, three replicas POST each of 200 alerts exactly once."""
    posts: Counter[str] = Counter()

    async def slow(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(POST_SECONDS)
        posts[request.headers[IDEMPOTENCY_HEADER]] += 1
        return web.Response(status=200)

    async with hook_server(slow) as url:
        # One attempt of at most 3 s per round: a claim's lease is 2 * 3.05 + 10 s, while
        # one replica alone would need 200 * 0.8 / 8 = 20 s for the whole backlog. (The
        # timeout leaves the receiver's 0.8 s a wide margin: a POST that times out after
        # the receiver accepted it is repeated by design, under the same idempotency key.)
        tuned = webhook_settings(url, timeout=3.0, attempts=1)
        clients = [Redis.from_url(redis_url) for _ in range(REPLICAS)]
        replicas = [handler("rejections", client, time.time, tuned) for client in clients]
        await replicas[0].handle(Batch("shardId-000000000000", storms()))

        async def run(replica: AlertHandler, deadline: float) -> None:
            while len(posts) < SIMS and time.monotonic() < deadline:
                await replica.tick(at(180))  # opens every storm; none closes
                await asyncio.sleep(0.2)

        deadline = time.monotonic() + 120
        await asyncio.gather(*(run(replica, deadline) for replica in replicas))
        for replica in replicas:
            await replica.flush()
        await close_all(replicas)
        for client in clients:
            await client.aclose()
    assert len(posts) == SIMS
    assert all(key.endswith(":open") for key in posts)
    assert [key for key, count in posts.items() if count > 1] == []
