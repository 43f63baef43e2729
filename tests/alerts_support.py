"""Helpers shared by the alert tests (this module holds no tests).

Simulated streams with their ground truth, hand-made events on a timeline, alert handlers
wired to a real redis, reading alerts back from the stream sink, and matching them to
the truth's episodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import events as sample_events
import orjson
import servers
from aiohttp import web
from redis.asyncio import Redis

from worker.devtools.simulator import SimulationOptions, generate
from worker.events.decode import decode
from worker.events.records import ConnectionEvent
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.rules.attach_loops import AttachLoopsHandler
from worker.handlers.alerts.rules.data_limit import DataLimitHandler
from worker.handlers.alerts.rules.rejections import RejectionsHandler
from worker.handlers.alerts.settings import AlertSettings
from worker.handlers.alerts.webhook import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    verify,
)
from worker.handlers.base import Batch, HandlerContext

PREFIX = "{sw:alerts-test:g}"
STREAM = f"{PREFIX}:alerts"
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
"""Start of hand-made timelines."""
SIM_A = "HS" + "a" * 32
SIM_B = "HS" + "b" * 32
FLEET_A = "HF" + "a" * 32
FLEET_B = "HF" + "b" * 32
HANDLERS: Mapping[str, type[AlertHandler]] = {
    "rejections": RejectionsHandler,
    "data_limit": DataLimitHandler,
    "attach_loops": AttachLoopsHandler,
}


class Clock:
    """A settable wall clock (Unix seconds) for handlers under test."""

    def __init__(self, now: datetime) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def event(
    kind: str,
    seq: int,
    seconds: float,
    *,
    sim: str = SIM_A,
    fleet: str = FLEET_A,
    vendor: str = "twilio",
    **fields: Any,
) -> ConnectionEvent:
    """One decoded event of ``kind`` at ``T0 + seconds``. ``seq`` makes its SID: the same
    kind and ``seq`` from the other ``vendor`` is the same event in KORE's envelope."""
    return sample_events.make_connection_event(
        kind, vendor, seq=seq, timestamp=iso(at(seconds)), sim_sid=sim, fleet_sid=fleet, **fields
    )


@functools.cache
def simulated(**options: Any) -> tuple[tuple[ConnectionEvent, ...], dict[str, Any]]:
    """A decoded simulated stream (connection events only) and its ground truth."""
    records, truth = generate(SimulationOptions(**options))
    decoded = (decode(record) for record in records)
    return tuple(item for item in decoded if isinstance(item, ConnectionEvent)), truth


NOISY: Mapping[str, Any] = {
    "sims": 150,
    "hours": 10,
    "seed": 20240301,
    "outage": True,
    "failure_bursts": True,
    "duplicate_share": 0.2,
    "shuffle_window": 60,
    "kore_share": 0.5,
    "data_as_string_share": 0.1,
}
"""A stream with every episode type, duplicates (also across vendors) and shuffling."""


def sim_end(options: Mapping[str, Any]) -> datetime:
    return SimulationOptions(**options).start + timedelta(hours=options["hours"])


def context(redis: Redis) -> HandlerContext[AlertSettings]:
    return HandlerContext(settings(), redis, PREFIX)


def settings(**overrides: Any) -> AlertSettings:
    """Alert settings for tests: log and stream sinks, no stale suppression unless asked."""
    values: dict[str, Any] = {"sinks": "log,stream", "stale_after": None}
    values.update(overrides)
    return AlertSettings(**values)


def handler(
    name: str,
    redis: Redis,
    clock: Callable[[], float],
    alert_settings: AlertSettings | None = None,
) -> AlertHandler:
    return HANDLERS[name](context(redis), settings=alert_settings or settings(), clock=clock)


async def feed(
    handlers: Sequence[AlertHandler],
    events: Sequence[ConnectionEvent],
    batch_size: int = 250,
    shard: str = "shardId-000000000000",
) -> None:
    for start in range(0, len(events), batch_size):
        batch = Batch(shard, events[start : start + batch_size])
        for item in handlers:
            await item.handle(batch)


async def finish(handlers: Sequence[AlertHandler], until: datetime) -> None:
    """Let event time reach ``until`` (closing quiet episodes) and deliver everything."""
    for item in handlers:
        await item.tick(until)
        await item.flush()


async def stream_alerts(redis: Redis) -> list[dict[str, Any]]:
    """Every alert the stream sink wrote, oldest first."""
    entries = await redis.xrange(STREAM)
    return [orjson.loads(fields[b"alert"]) for _, fields in entries]


def by_status(alerts: Iterable[Mapping[str, Any]], kind: str, status: str) -> list[Any]:
    return [a for a in alerts if a["kind"] == kind and a["status"] == status]


@dataclass
class Matched:
    """Truth episodes of one kind against the open alerts found for them."""

    kind: str
    found: list[tuple[Mapping[str, Any], list[Mapping[str, Any]]]] = field(default_factory=list)
    extra: list[Mapping[str, Any]] = field(default_factory=list)

    @property
    def not_exactly_once(self) -> list[Any]:
        return [(episode, len(hits)) for episode, hits in self.found if len(hits) != 1]


def match(
    alerts: Sequence[Mapping[str, Any]],
    kind: str,
    episodes: Sequence[Mapping[str, Any]],
    subject: Callable[[Mapping[str, Any]], str],
) -> Matched:
    """Pair each truth episode with the open alerts of its subject whose (final) event-time
    range overlaps it; open alerts paired with no episode are ``extra``."""
    final = {a["id"]: a for a in alerts if a["status"] == "resolved"}
    opened: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for alert in by_status(alerts, kind, "open"):
        opened[alert["subject"]].append(final.get(alert["id"], alert))
    result = Matched(kind)
    used: set[str] = set()
    for episode in episodes:
        first = parse(episode.get("first") or episode["blocked_at"])
        ending = episode.get("last") or episode.get("unblocked_at")
        last = parse(ending) if ending else datetime.max.replace(tzinfo=UTC)
        hits = [
            a
            for a in opened[subject(episode)]
            if parse(a["first_seen"]) <= last and parse(a["last_seen"]) >= first
        ]
        used.update(a["id"] for a in hits)
        result.found.append((episode, hits))
    result.extra = [a for group in opened.values() for a in group if a["id"] not in used]
    return result


def sim_subject(episode: Mapping[str, Any]) -> str:
    return f"sim:{episode['sim_sid']}"


def fleet_subject(episode: Mapping[str, Any]) -> str:
    return f"fleet:{episode['fleet_sid']}/network:{episode['network']}"


class Receiver:
    """A webhook endpoint on 127.0.0.1 (a real aiohttp server): checks each request's
    signature, records accepted alerts by idempotency key, and can be told to fail."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.accepted: dict[str, dict[str, Any]] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.repeats = 0
        """Requests accepted for a key that was already accepted."""
        self.requests = 0
        self.bad_signatures = 0
        self.status = 200
        """Answer to give (after signature checks); 200 accepts."""
        self.fail_next = 0
        """Answer this many requests with 503 first."""
        self.delay = 0.0
        """Seconds to wait before answering the next request (then reset)."""
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.delay:
            delay, self.delay = self.delay, 0.0
            await asyncio.sleep(delay)
        signed = verify(
            self.secret,
            body,
            timestamp=request.headers.get(TIMESTAMP_HEADER),
            signature=request.headers.get(SIGNATURE_HEADER),
        )
        if not signed:
            self.bad_signatures += 1
            return web.Response(status=401)
        if self.fail_next:
            self.fail_next -= 1
            return web.Response(status=503)
        if self.status != 200:
            return web.Response(status=self.status)
        key = request.headers[IDEMPOTENCY_HEADER]
        if key in self.accepted:
            self.repeats += 1
        else:
            self.accepted[key] = orjson.loads(body)
            self.headers[key] = dict(request.headers)
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/alerts", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        # Port 0: the OS picks a free port as it binds, so no other process can take the
        # port between its choice and the bind.
        await web.TCPSite(self._runner, servers.HOST, 0).start()
        self.url = f"http://{servers.HOST}:{self._runner.addresses[0][1]}/alerts"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


SECRET = "test-webhook-secret"


def webhook_settings(url: str, **overrides: Any) -> AlertSettings:
    """Stream and webhook sinks with fast retries, for a receiver at ``url``."""
    webhook: dict[str, Any] = {
        "url": url,
        "secret": SECRET,
        "timeout": 2.0,
        "attempts": 3,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "retry_base": 1.0,
        "retry_cap": 5.0,
    }
    webhook.update(overrides)
    return settings(sinks="log,stream,webhook", webhook=webhook)


async def close_all(handlers: Iterable[AlertHandler]) -> None:
    for item in handlers:
        await item.close()


@contextlib.asynccontextmanager
async def hook_server(
    answer: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """A webhook receiver on 127.0.0.1 answering every POST with ``answer``; yields its URL."""
    app = web.Application()
    app.router.add_post("/hook", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


@dataclass
class Episode:
    """One episode of the reference model (times in any one unit)."""

    first: int
    last: int
    count: int
    opened: int
    why: str = ""


def reference(items: list[tuple[int, bool]], threshold: int, window: int) -> list[Episode]:
    """The episode rules as a pure-Python reference model: one subject's episodes from
    ``(time, is_hit)`` items (unique events), read in event-time order (a hit before a clear
    at the same time). The rules are spelt out in ``test_alerts_reference``."""
    ordered = sorted(items, key=lambda item: (item[0], not item[1]))
    episodes: list[Episode] = []
    current: Episode | None = None
    floor = float("-inf")  # hits at or before this cannot join a new episode
    hits: list[int] = []  # hits after floor, not in an episode
    for ts, is_hit in ordered:
        if current is not None and ts > current.last + window:
            current.why = "quiet"
            floor = max(floor, current.last)
            current = None
        if is_hit:
            if current is not None:
                current.last = ts
                current.count += 1
                continue
            hits.append(ts)
            recent = [t for t in hits if t > floor and ts - t <= window]
            if len(recent) >= threshold:
                chained = [t for t in hits if t > floor]
                first = recent[0]
                for t in reversed([t for t in chained if t < first]):
                    if first - t > window:
                        break
                    first = t
                members = [t for t in chained if t >= first]
                current = Episode(first, ts, len(members), ts)
                episodes.append(current)
                hits = []
        else:
            if current is not None and ts >= current.first:
                current.why = "recovered"
                current = None
            floor = max(floor, ts)
            hits = [t for t in hits if t > ts]
    if current is not None:
        current.why = "quiet"
    return episodes
