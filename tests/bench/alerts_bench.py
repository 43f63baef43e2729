"""Alert handlers: CPU per event and Redis round trips per batch.

Each alert handler (``rejections``, ``data_limit``, ``attach_loops``) handles a simulated
stream (duplicates, shuffling, both envelopes, every episode kind) in batches against a
real ``redis-server`` started for the run. Figures:

- worker CPU µs per event: ``time.process_time`` of the worker process while it handles
  the batches (turning events into subjects, encoding the request, reading the reply);
- redis CPU µs per event: the server's own ``usec`` for the episode script, from
  ``INFO commandstats`` (the Lua work that Python does not see);
- round trips per batch: commands the handler sent while handling (one EVALSHA each);
- delivery round trips: the dispatcher's calls, off the batch path: a settle per delivery
  round (and one per webhook delivery, settled as it ends), and a pipelined check per
  round whose resolutions' openings went out in an earlier round; and the alerts written.

Logging is discarded during the run so that the figures are the handlers' own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import servers  # noqa: E402 - tests/ is put on sys.path just above
import structlog  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from worker.devtools.simulator import SimulationOptions, generate  # noqa: E402
from worker.events.decode import decode  # noqa: E402
from worker.events.records import ConnectionEvent  # noqa: E402
from worker.handlers.alerts.episodes import SCRIPT as EPISODES  # noqa: E402
from worker.handlers.alerts.handler import AlertHandler  # noqa: E402
from worker.handlers.alerts.outbox import CLAIM  # noqa: E402
from worker.handlers.alerts.outbox import SCRIPT as OUTBOX  # noqa: E402
from worker.handlers.alerts.rules.attach_loops import AttachLoopsHandler  # noqa: E402
from worker.handlers.alerts.rules.data_limit import DataLimitHandler  # noqa: E402
from worker.handlers.alerts.rules.rejections import RejectionsHandler  # noqa: E402
from worker.handlers.alerts.settings import AlertSettings  # noqa: E402
from worker.handlers.base import Batch, HandlerContext  # noqa: E402

KEY = "alerts"
TITLE = "Alerts: CPU per event and Redis round trips per batch"
GOAL_ROUND_TRIPS = 1.0
"""Target: at most one Redis round trip per batch per handler."""
BATCH = 500
HANDLERS: dict[str, type[AlertHandler]] = {
    "rejections": RejectionsHandler,
    "data_limit": DataLimitHandler,
    "attach_loops": AttachLoopsHandler,
}


class CountingRedis(Redis):
    """Counts the commands it sends, by name (each is one round trip)."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = str(args[0])
        self.sent.append(f"{name} {args[1]}" if name == "EVALSHA" else name)
        return await super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        self.sent.append("PIPELINE")  # one round trip, whatever it holds
        return super().pipeline(transaction, shard_hint)


def options(quick: bool) -> SimulationOptions:
    return SimulationOptions(
        sims=200 if quick else 1000,
        hours=6 if quick else 24,
        seed=20240301,
        outage=True,
        failure_bursts=True,
        duplicate_share=0.1,
        shuffle_window=30,
        kore_share=0.5,
    )


async def script_usec(client: Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("usec", 0))


async def measure(
    url: str, name: str, events: list[ConnectionEvent], end: float
) -> dict[str, float]:
    client = CountingRedis.from_url(url)
    client.sent = []
    await client.flushdb()
    await client.config_resetstat()
    settings = AlertSettings(sinks="log,stream", stale_after=None)
    context = HandlerContext(settings, client, "{sw:bench:g}")
    now = [end]  # wall time moves on by a second per batch, as while a backlog is read
    handler = HANDLERS[name](context, settings=settings, clock=lambda: now[0])
    batches = [
        Batch("shardId-000000000000", events[i : i + BATCH]) for i in range(0, len(events), BATCH)
    ]
    await handler.handle(batches[0])  # loads the script
    await handler.flush()
    client.sent.clear()
    redis_before = await script_usec(client)
    cpu = 0.0
    for batch in batches[1:]:
        started = time.process_time()
        await handler.handle(batch)
        cpu += time.process_time() - started
        now[0] += 1
    before_tick = len(client.sent)
    await handler.tick()  # caught up: event time reaches the wall clock, everything closes
    await handler.flush()
    counted = len(events) - len(batches[0])
    redis_usec = await script_usec(client) - redis_before
    # The dispatcher runs concurrently, so commands are told apart by script, not by time.
    episode_calls = client.sent.count(f"EVALSHA {hashlib.sha1(EPISODES.encode()).hexdigest()}")
    delivery_calls = sum(
        client.sent.count(f"EVALSHA {hashlib.sha1(script.encode()).hexdigest()}")
        for script in (OUTBOX, CLAIM)
    ) + client.sent.count("PIPELINE")
    # The closing tick's episode script calls (one, or more while subjects stay due),
    # outside the batches.
    tick_calls = client.sent[before_tick:].count(
        f"EVALSHA {hashlib.sha1(EPISODES.encode()).hexdigest()}"
    )
    loads = sum(sent.startswith("SCRIPT") for sent in client.sent)  # once per script
    others = len(client.sent) - episode_calls - delivery_calls - loads - 2  # and two INFOs
    episode_calls -= tick_calls
    alerts = await client.xlen("{sw:bench:g}:alerts")
    await handler.close()
    await client.aclose()
    return {
        "events": counted,
        "batches": len(batches) - 1,
        "cpu_us": cpu / counted * 1e6,
        "redis_us": redis_usec / counted,
        "trips": (episode_calls + others) / (len(batches) - 1),
        "delivery": delivery_calls,
        "alerts": alerts,
    }


async def _run(quick: bool) -> str:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        cache_logger_on_first_use=False,
    )
    opts = options(quick)
    records, _ = generate(opts)
    events = [e for e in map(decode, records) if isinstance(e, ConnectionEvent)]
    end = opts.end_ts + 600.0
    server = servers.start_redis()
    try:
        rows = {name: await measure(server.url, name, events, end) for name in HANDLERS}
    finally:
        server.stop()
        structlog.reset_defaults()
    lines = [
        f"Stream: {opts.sims} SIMs over {opts.hours:g} h, {len(events):,} connection events "
        f"(10% duplicates, half in KORE's envelope, 30 s shuffle, every episode kind), "
        f"batches of {BATCH}, against a local redis-server {'(quick run)' if quick else ''}.",
        "",
        "| handler | worker CPU µs/event | redis CPU µs/event | round trips/batch "
        "| delivery round trips | alerts |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| `{name}` | {row['cpu_us']:.1f} | {row['redis_us']:.1f} | {row['trips']:.2f} "
            f"| {row['delivery']:.0f} | {row['alerts']:.0f} |"
        )
    worst = max(row["trips"] for row in rows.values())
    verdict = "met" if worst <= GOAL_ROUND_TRIPS else "NOT met"
    lines += [
        "",
        f"Goal: at most {GOAL_ROUND_TRIPS:g} Redis round trip per batch per handler: {verdict} "
        f"(worst {worst:.2f}). Delivery round trips happen in the dispatcher's background task, "
        "a settle per delivery round (and per webhook delivery) and a check of earlier "
        "openings, not per batch.",
    ]
    return "\n".join(lines) + "\n"


def run(quick: bool = False) -> str:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
