"""The worker process: builds the pieces from the settings, runs them, stops them cleanly.

SIGTERM or SIGINT stops reading, lets in-flight batches finish (bounded by
``shutdown_timeout``), checkpoints, releases leases and returns; a second signal exits
at once with status 130.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel
from redis.asyncio import Redis

from worker import keys, logs
from worker.consumer import kinesis, redis_checks
from worker.consumer.checkpoints import Checkpoints
from worker.consumer.deadletter import DeadLetterStore, LengthGauge
from worker.consumer.fanout import open_retrieval
from worker.consumer.http import Health, HttpServer
from worker.consumer.leases import LeaseManager
from worker.consumer.pipeline import BatchProcessor
from worker.consumer.progress import ProgressReporter
from worker.consumer.shard_reader import ShardProgress, ShardReader
from worker.consumer.supervisor import Supervisor
from worker.consumer.ticker import Ticker
from worker.errors import ConfigError
from worker.handlers import registry
from worker.handlers.base import Handler, ShardListener, Starts, StreamFacts
from worker.metrics import Metrics
from worker.settings import Settings, load_settings

T = TypeVar("T")


@dataclass(slots=True)
class RunSummary:
    seconds: float = 0.0
    caught_up: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    abandoned: list[str] = field(default_factory=list)
    """Shards whose reader ignored its cancellation at shutdown (a handler swallowing it)
    and was left running; their leases were released all the same."""
    last_tick_incomplete: dict[str, str] = field(default_factory=dict)
    """By handler: what its last tick and flush (a run that ended caught up) left undone: a
    call that failed or timed out, what its flush said was left (alerts to deliver, subjects
    the tick may not have walked), or all of it when a stop cut the last tick short. It waits
    for a later run of the group."""


DEAD_LETTER_GAUGE_EVERY = 15.0
"""Seconds between reads of the dead-letter store's length for its gauge (a scrape
interval): entries redriven or deleted elsewhere show within it."""
GC_THRESHOLD = (500_000, 50, 100)
"""Young collections once the tracked objects alive grew by 500,000: more than a shard's
batches held at once at the largest batch limit (a 10,000-record batch is about 200,000
tracked objects decoded, and one more is read ahead), so a batch's objects are mostly freed
by reference counting before any collection walks them. At 50,000, collections walked each batch's objects while it was
alive: 0.45-0.81 s of collection against 0.02-0.21 s at 500,000 for 105,467 records
(BENCHMARKS.md), the same peak RSS. Cyclic garbage waits longer for its collection, bounded
by the same count."""


def tune_gc() -> None:
    """Make garbage collection cheap for a long-running consumer.

    Everything alive after start-up (modules, botocore's service models) is frozen out of
    collection, and young collections run once ``GC_THRESHOLD[0]`` more tracked objects are
    alive instead of 700, so big batches neither trigger full collections over the whole
    heap nor are walked by young ones while they are handled. Call once, before running.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def owner_id() -> str:
    """This replica's id: its host name (the pod's, in Kubernetes), the process id and a
    random suffix, so two processes on one host, or a restart, never share an id."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def redis_client(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis_dsn, health_check_interval=30, socket_timeout=10)


@dataclass(slots=True)
class Services:
    """Everything a running worker holds, for the commands that need part of it."""

    settings: Settings
    redis: Redis
    key_prefix: str
    metrics: Metrics
    dead_letters: DeadLetterStore
    handlers: list[Handler]


def command_settings(what: str) -> Settings:
    """Settings for a maintenance command on one stream's state (``what`` says which),
    with logging configured: the stream name is required."""
    settings = load_settings()
    if not settings.stream_name:
        raise ConfigError(f"SUPERSIM_STREAM_NAME: required ({what} is per stream)")
    logs.configure(settings.log_format.value, settings.log_level.value, settings.redact_pii)
    return settings


@asynccontextmanager
async def services(
    settings: Settings, *, sections: Mapping[str, BaseModel] | None = None
) -> AsyncIterator[Services]:
    """Redis, the dead-letter store and the configured handlers, each with its settings
    section (from ``sections`` when given there, else from the environment); closed on
    exit."""
    redis = redis_client(settings)
    key_prefix = keys.prefix(settings.stream_name, settings.consumer_group)
    metrics = Metrics()
    handlers: list[Handler] = []
    try:
        await redis.ping()  # type: ignore[misc]  # redis-py types sync|async
        dlq = DeadLetterStore(redis, keys.dead_letters(key_prefix), settings.dlq_maxlen, metrics)
        handlers = registry.build(settings.handlers, redis, key_prefix, sections=sections)
        yield Services(settings, redis, key_prefix, metrics, dlq, handlers)
    finally:
        # Concurrently: each alert handler may take a few seconds to finish its deliveries,
        # and the orchestrator's grace period counts them all.
        await asyncio.gather(*(close_handler(handler) for handler in handlers))
        await redis.aclose()


async def close_handler(handler: Handler) -> None:
    """Close a handler; a failure is logged, never raised (the others still close)."""
    try:
        await handler.close()
    except Exception as exc:
        structlog.get_logger("worker.consumer.app").warning(
            "handler_close_failed", handler=handler.name, error=f"{type(exc).__name__}: {exc}"
        )


async def run_worker(
    settings: Settings,
    *,
    from_start: bool = False,
    at_timestamp: datetime | None = None,
    until_caught_up: bool = False,
    install_signals: bool = True,
    show_progress: bool | None = None,
    stop: asyncio.Event | None = None,
    sections: Mapping[str, BaseModel] | None = None,
) -> RunSummary:
    """Consume the stream until stopped (or caught up); returns what happened.
    ``sections`` gives handlers' settings sections instead of the environment."""
    log = structlog.get_logger("worker.consumer.app")
    started = time.monotonic()
    replica = owner_id()
    logs.bind_process(stream=settings.stream_name, group=settings.consumer_group, replica=replica)
    async with AsyncExitStack() as stack:
        svc = await stack.enter_async_context(services(settings, sections=sections))
        progress: dict[str, ShardProgress] = {}
        health = Health(svc.redis, lambda: list(progress.values()), settings.stall_timeout)
        await stack.enter_async_context(HttpServer(svc.metrics, health, settings.http_port))
        await stack.enter_async_context(LengthGauge(svc.dead_letters, DEAD_LETTER_GAUGE_EVERY))
        await redis_checks.check_access(svc.redis, svc.key_prefix)
        await redis_checks.check_eviction_policy(
            svc.redis, require_noeviction=settings.require_noeviction
        )
        client = await stack.enter_async_context(kinesis.client(settings))
        await _start_handlers(svc.handlers, client, settings)
        # Fan-out refused while running, with SUPERSIM_FANOUT_REFUSED=stop: stop the worker.
        retrieval = await stack.enter_async_context(
            open_retrieval(settings, client, svc.metrics, on_refused=lambda: supervisor.stop())
        )
        supervisor = Supervisor(
            settings=settings,
            kinesis=client,
            leases=LeaseManager(svc.redis, svc.key_prefix, replica, settings.lease_ttl),
            checkpoints=Checkpoints(svc.redis, svc.key_prefix, settings.lease_ttl),
            processor=BatchProcessor(
                svc.handlers,
                svc.dead_letters,
                svc.metrics,
                attempts=settings.handler_attempts,
                outage_patience=settings.handler_outage_patience,
                timeout=settings.handler_timeout,
            ),
            from_start=from_start,
            at_timestamp=at_timestamp,
            until_caught_up=until_caught_up,
            listeners=[h for h in svc.handlers if isinstance(h, ShardListener)],
            reader_factory=partial(ShardReader, retrieval=retrieval),
        )
        progress = supervisor.progress
        health.started = True
        if install_signals:
            _install_signals(supervisor)
        backfill = from_start or at_timestamp is not None or until_caught_up
        tty = sys.stderr.isatty() if show_progress is None else show_progress
        reporter = ProgressReporter(supervisor.progress, tty=tty, enabled=backfill)
        log.info(
            "worker_started",
            stream=settings.stream_name,
            consumer_group=settings.consumer_group,
            handlers=list(settings.handlers),
            retrieval=retrieval.name,
            from_start=from_start,
            at_timestamp=at_timestamp.isoformat() if at_timestamp else None,
        )
        ticker = Ticker(
            svc.handlers,
            supervisor.all_caught_up,
            svc.metrics,
            interval=settings.idle_interval,
            timeout=settings.handler_timeout,
        )
        incomplete: dict[str, str] | None = None
        async with reporter, _stopping_on(stop, supervisor):
            async with ticker:
                await supervisor.run()
            # What a stop before or during the last tick leaves undone: all of it.
            cut_short = dict.fromkeys(ticker.last, "its last tick was cut short by a stop")
            if supervisor.caught_up and supervisor.stopping:
                if cut_short:
                    log.warning("last_tick_cut_short", started=False)
                incomplete = cut_short
            elif supervisor.caught_up:
                # Ended caught up on every shard (``--until-caught-up``): tick once, as the
                # ticker does while every shard stays caught up, so that what event time has
                # passed is walked and closed now (a short backfill ends within its warm-up,
                # its last events within the quiet grace), and deliver what that queued,
                # not left for a later run of the group (a backfill's may never come). A
                # stop asked for meanwhile (a signal, ``stop``) cuts it short.
                incomplete = await _unless_stopped(ticker.last_tick(), supervisor)
                if incomplete is None:
                    incomplete = cut_short
            if incomplete:
                log.warning("last_tick_incomplete", handlers=incomplete)
        summary = RunSummary(
            seconds=time.monotonic() - started,
            caught_up=supervisor.caught_up,
            metrics=svc.metrics.snapshot(),
            abandoned=list(supervisor.abandoned),
            last_tick_incomplete=incomplete or {},
        )
        log.info("worker_stopped", seconds=round(summary.seconds, 2), **summary.metrics)
        return summary


async def _start_handlers(
    handlers: Sequence[Handler], client: kinesis.KinesisClient, settings: Settings
) -> None:
    """Call the ``start`` hook of the handlers that have one, with the stream's facts."""
    starting = [handler for handler in handlers if isinstance(handler, Starts)]
    if not starting:
        return
    facts = StreamFacts(
        stream_name=settings.stream_name,
        retention_hours=await kinesis.retention_hours(client, settings.stream_name),
    )
    for handler in starting:
        await handler.start(facts)


async def _unless_stopped(work: Coroutine[Any, Any, T], supervisor: Supervisor) -> T | None:
    """Run ``work`` to its end and return its result, or cancel it once a stop is asked for
    (``supervisor.stop``: a signal, or ``run_worker``'s ``stop``) and return None, so that a
    stop is still prompt. What ``work`` raises is raised here, as is the cancellation of the
    caller."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(supervisor.stop_requested())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        if not task.done():
            if supervisor.stopping:
                structlog.get_logger("worker.consumer.app").warning(
                    "last_tick_cut_short", started=True
                )
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()  # or a failure of the work itself (handlers' are logged by the ticker)


@asynccontextmanager
async def _stopping_on(stop: asyncio.Event | None, supervisor: Supervisor) -> AsyncIterator[None]:
    """While inside, ``stop`` being set (if given) asks the supervisor to stop gracefully,
    as a signal does: during the run and during its last tick alike."""
    if stop is None:
        yield
        return
    waiter = asyncio.create_task(stop.wait(), name="stop-waiter")
    # Only when ``stop`` was set: cancelling the waiter below is not a stop request.
    waiter.add_done_callback(lambda done: None if done.cancelled() else supervisor.stop())
    try:
        yield
    finally:
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


def _install_signals(supervisor: Supervisor) -> None:
    loop = asyncio.get_running_loop()
    log = structlog.get_logger("worker.consumer.app")
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if received:
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(130)
        received.append(signum)
        log.info("stopping", signal=signal.Signals(signum).name)
        supervisor.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
