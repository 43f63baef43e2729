"""The worker's HTTP endpoints (aiohttp.web, on ``SUPERSIM_HTTP_PORT``; off when unset).

- ``/metrics``: the Prometheus metrics (``worker.metrics``).
- ``/healthz`` (liveness): the event loop answers, and no shard this replica reads has
  been stuck for ``SUPERSIM_STALL_TIMEOUT``: a batch taken up that long ago and still not
  handled (a hung handler, or one timing out or failing on every try), or records waiting
  (MillisBehindLatest > 0) with no batch handled that long.
- ``/readyz`` (readiness): the start-up checks passed, Redis answers a PING within a
  second, and Kinesis answered one of this replica's readers within ``KINESIS_QUIET``
  (a replica without shards counts on its start-up checks).

Each answers 200 or 503 with a JSON body naming what is wrong. ``supersim-worker health``
asks the same endpoints, for exec probes and container health checks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from worker.consumer.shard_reader import ShardProgress
from worker.metrics import Metrics

KINESIS_QUIET = 120.0
"""Seconds without an answer from Kinesis to any reader after which /readyz fails."""


@dataclass(slots=True)
class Health:
    """What the probes look at: the readers' progress, Redis, and the start-up checks."""

    redis: Redis
    progress: Callable[[], Iterable[ShardProgress]]
    stall_timeout: float
    started: bool = False
    """Set once the start-up checks passed."""
    notes: dict[str, str] = field(default_factory=dict)

    def live(self, now: float | None = None) -> list[str]:
        """Why the worker is not live (empty when it is)."""
        now = time.monotonic() if now is None else now
        problems = []
        for shard in self.progress():
            waiting = shard.stuck_since(now)
            if waiting is not None and now - waiting > self.stall_timeout:
                problems.append(
                    f"shard {shard.shard_id}: a batch taken up {now - waiting:.0f} s ago "
                    "is still not handled (see handler_failed and the handler metrics)"
                )
            elif (
                shard.reading
                and shard.millis_behind
                and now - shard.progressed > self.stall_timeout
            ):
                problems.append(
                    f"shard {shard.shard_id}: records waiting, no batch handled for "
                    f"{now - shard.progressed:.0f} s"
                )
        return problems

    async def ready(self, now: float | None = None) -> list[str]:
        """Why the worker is not ready (empty when it is)."""
        now = time.monotonic() if now is None else now
        problems = []
        if not self.started:
            problems.append("start-up checks have not passed yet")
        try:
            await asyncio.wait_for(self.redis.ping(), 1.0)  # type: ignore[arg-type]  # redis-py types sync|async
        except Exception as exc:
            problems.append(f"redis: {type(exc).__name__}: {exc}")
        reading = [shard for shard in self.progress() if shard.reading]
        answered = [shard.kinesis_ok for shard in reading if shard.kinesis_ok is not None]
        started = [shard.started for shard in reading]
        if reading and not any(now - at <= KINESIS_QUIET for at in [*answered, *started]):
            problems.append(f"kinesis: no answer to any reader for {KINESIS_QUIET:.0f} s")
        return problems


def application(metrics: Metrics, health: Health) -> web.Application:
    async def metrics_page(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return _answer(health.live())

    async def readyz(_: web.Request) -> web.Response:
        return _answer(await health.ready())

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _answer(problems: list[str]) -> web.Response:
    body: dict[str, Any] = {"ok": not problems, "problems": problems}
    return web.Response(
        status=503 if problems else 200,
        body=orjson.dumps(body),
        content_type="application/json",
    )


class HttpServer:
    """The endpoints as an async context: listening on entry, closed on exit."""

    def __init__(self, metrics: Metrics, health: Health, port: int | None) -> None:
        self._app = application(metrics, health)
        self._port = port
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HttpServer:
        if self._port is not None:
            self._runner = web.AppRunner(self._app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, host="0.0.0.0", port=self._port).start()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
