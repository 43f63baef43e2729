"""The whole product: a simulated fleet's stream through Kinesis, the worker and all handlers."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from datetime import date, timedelta
from typing import Any

import orjson
import redis
from alerts_support import Receiver, fleet_subject, match, sim_subject, webhook_settings
from kinesis_support import create_stream, put, worker_settings
from recording import seen_key, ticked_key
from structlog.testing import capture_logs

from worker import keys
from worker.consumer.app import run_worker
from worker.devtools.simulator import SimulationOptions, generate
from worker.handlers.alerts.settings import AlertSettings
from worker.handlers.metering.usage import figures
from worker.settings import Settings

HANDLERS = ("metering", "rejections", "data_limit", "attach_loops")
ALERT_HANDLERS = ("rejections", "data_limit", "attach_loops")
OPTIONS = SimulationOptions(
    sims=70,
    hours=3,
    seed=424242,
    fleets=2,
    outage=True,
    failure_bursts=True,
    duplicate_share=0.1,
    shuffle_window=120,
    kore_share=0.3,
    data_as_string_share=0.2,
    test_events=3,
)


def usage_per_sim_day(client: redis.Redis, prefix: str, truth: dict[str, Any]) -> dict[str, Any]:
    days = sorted({day for per_day in truth["usage"]["per_sim_day"].values() for day in per_day})
    first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    found: dict[str, dict[str, dict[str, int]]] = {}
    for sim in truth["sims"]:
        for row in figures(client, prefix, "sim", sim, first, last):
            if row.total:
                found.setdefault(sim, {})[row.period] = {
                    "down": row.down,
                    "up": row.up,
                    "total": row.total,
                }
    return found


def alerts(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"alert"]) for _, fields in client.xrange(f"{prefix}:alerts")]


def expected_alerts(truth: dict[str, Any]) -> int:
    """One open and one resolved alert per injected episode; a data-limit block still in
    force at the end of the simulation has no resolution yet."""
    episodes = (
        truth["rejection_storms"]
        + truth["fleet_rejection_episodes"]
        + truth["failure_bursts"]
        + truth["attach_loops"]
    )
    blocks = truth["data_limit_episodes"]
    return 2 * len(episodes) + len(blocks) + sum(1 for b in blocks if b["unblocked_at"])


def check_exact(client: redis.Redis, prefix: str, truth: dict[str, Any]) -> dict[str, Any]:
    """Usage per SIM and day equals the truth; one open (and resolved) alert per episode."""
    expected = {
        sim: {day: dict(figures_) for day, figures_ in per_day.items()}
        for sim, per_day in truth["usage"]["per_sim_day"].items()
    }
    assert usage_per_sim_day(client, prefix, truth) == expected
    found = alerts(client, prefix)
    assert len(found) == expected_alerts(truth)
    assert max(Counter((a["id"], a["status"]) for a in found).values()) == 1
    for kind, episodes, subject in [
        ("rejection_storm", truth["rejection_storms"], sim_subject),
        ("fleet_network_rejections", truth["fleet_rejection_episodes"], fleet_subject),
        ("attach_loop", truth["attach_loops"], sim_subject),
        ("data_limit_reached", truth["data_limit_episodes"], sim_subject),
    ]:
        assert episodes, f"the simulation injected no {kind} episode"
        matched = match(found, kind, episodes, subject)
        assert matched.not_exactly_once == [], kind
        assert matched.extra == [], kind
    return expected


SECTIONS = {"alerts": AlertSettings(sinks="log,stream", stale_after=None, shard_warmup=1)}
"""The alert handlers' settings section, given explicitly instead of the environment."""


async def run_until_alerted(
    settings: Settings, client: redis.Redis, prefix: str, truth: dict[str, Any], workers: int
) -> None:
    """Run ``workers`` live workers of one consumer group until every alert is out."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            run_worker(settings, install_signals=False, stop=stop, sections=SECTIONS)
        )
        for _ in range(workers)
    ]
    try:
        wanted = expected_alerts(truth)
        for _ in range(600):
            await asyncio.sleep(0.1)
            if any(task.done() for task in tasks) or len(alerts(client, prefix)) >= wanted:
                break
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)


async def prepare(endpoint: str, redis_url: str) -> tuple[Settings, str, dict[str, Any]]:
    records, truth = generate(OPTIONS)
    stream = f"e2e-{uuid.uuid4().hex[:8]}"
    await create_stream(endpoint, stream, shards=4)
    await put(endpoint, stream, records)
    settings = worker_settings(
        endpoint,
        redis_url,
        stream,
        handlers=HANDLERS,
        batch_limit=200,
    )
    return settings, keys.prefix(stream, "supersim-worker"), truth


async def test_two_workers_sharing_the_stream_meter_exactly_and_alert_once(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """Two replicas of one consumer group running at once: results are as with one."""
    settings, prefix, truth = await prepare(kinesalite_endpoint, redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        await run_until_alerted(settings, client, prefix, truth, workers=2)
        check_exact(client, prefix, truth)
    finally:
        client.close()


async def test_simulated_fleet_is_metered_exactly_and_alerts_once_even_after_a_full_replay(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """Exact usage per SIM and day, one alert (and one resolution) per injected episode,
    and a full backfill over the same history changes neither."""
    settings, prefix, truth = await prepare(kinesalite_endpoint, redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        await run_until_alerted(settings, client, prefix, truth, workers=1)
        expected = check_exact(client, prefix, truth)
        first_alerts = alerts(client, prefix)

        replay = await run_worker(
            settings,
            from_start=True,
            until_caught_up=True,
            install_signals=False,
            sections=SECTIONS,
        )
        assert replay.caught_up
        assert usage_per_sim_day(client, prefix, truth) == expected
        assert alerts(client, prefix) == first_alerts
    finally:
        client.close()


async def test_a_backfill_job_that_ends_caught_up_walks_and_alerts_what_event_time_passed(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """``run --from-start --until-caught-up`` ticks once when it ends caught up, as a live
    worker does while caught up, and delivers what that queued: a backfill that ends within
    its warm-up (nothing walked or closed while it ran) still finds and sends every
    episode's opening and resolution, exactly once."""
    settings, prefix, truth = await prepare(kinesalite_endpoint, redis_url)
    # No periodic tick while it runs (they come every idle interval once every shard is
    # caught up): only the last one can walk.
    settings = settings.model_copy(update={"idle_interval": 30.0})
    client = redis.Redis.from_url(redis_url)
    try:
        long_warmup = {
            "alerts": SECTIONS["alerts"].model_copy(update={"shard_warmup": timedelta(hours=1)})
        }
        summary = await run_worker(
            settings,
            from_start=True,
            until_caught_up=True,
            install_signals=False,
            sections=long_warmup,
        )
        assert summary.caught_up
        assert summary.last_tick_incomplete == {}
        for name in ALERT_HANDLERS:
            assert client.zcard(f"{prefix}:alerts:{name}:pend") == 0, name
            assert client.hlen(f"{prefix}:alerts:{name}:outbox") == 0, name
        check_exact(client, prefix, truth)
    finally:
        client.close()


async def test_a_backfill_job_whose_webhook_fails_says_so_and_its_retry_delivers(
    kinesalite_endpoint: str, redis_url: str, receiver: Receiver
) -> None:
    """A backfill Job whose webhook refuses what its last tick sends ends caught up but
    says, by handler, how many alerts it left undelivered (the ``run`` command exits 3);
    a later run of the group, resuming at the checkpoints, delivers them: every alert
    reaches the webhook exactly once."""
    settings, prefix, truth = await prepare(kinesalite_endpoint, redis_url)
    settings = settings.model_copy(update={"idle_interval": 30.0})  # only the last tick
    # A failed delivery is due again 2-4 s later: after the flush's few rounds, as a rule (a
    # round that comes later only fails them again), and before the rerun.
    hooked = webhook_settings(receiver.url, retry_base=4.0, retry_cap=4.0)
    sections = {
        "alerts": hooked.model_copy(
            update={"stale_after": None, "shard_warmup": timedelta(hours=1)}
        )
    }
    client = redis.Redis.from_url(redis_url)
    try:
        receiver.status = 503
        with capture_logs() as logs:
            summary = await run_worker(
                settings,
                from_start=True,
                until_caught_up=True,
                install_signals=False,
                sections=sections,
            )
        assert summary.caught_up
        assert sorted(summary.last_tick_incomplete) == sorted(ALERT_HANDLERS)
        for name, left in summary.last_tick_incomplete.items():
            waiting = client.hlen(f"{prefix}:alerts:{name}:outbox")
            assert waiting > 0, name
            assert left.startswith(f"{waiting} alert transition(s) still in the outbox"), left
        assert [e["handlers"] for e in logs if e["event"] == "last_tick_incomplete"] == [
            summary.last_tick_incomplete
        ]
        assert receiver.accepted == {}

        receiver.status = 200
        await asyncio.sleep(4.2)  # past the retries' due times (at most retry_cap)
        summary = await run_worker(
            settings, until_caught_up=True, install_signals=False, sections=sections
        )
        assert summary.caught_up
        assert summary.last_tick_incomplete == {}
        for name in ALERT_HANDLERS:
            assert client.hlen(f"{prefix}:alerts:{name}:outbox") == 0, name
        check_exact(client, prefix, truth)
        delivered = Counter((a["id"], a["status"]) for a in receiver.accepted.values())
        assert delivered == Counter((a["id"], a["status"]) for a in alerts(client, prefix))
        assert receiver.repeats == 0
    finally:
        client.close()


async def test_a_stop_asked_for_during_the_last_tick_cuts_it_short(
    kinesalite_endpoint: str, redis_url: str
) -> None:
    """The last tick of a run that ended caught up is cut short by a stop (a signal in
    production), instead of holding the exit for the handler timeout."""
    records, _ = generate(SimulationOptions(sims=3, hours=1, seed=5))
    stream = f"lt-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    await put(kinesalite_endpoint, stream, records[:20])
    settings = worker_settings(
        kinesalite_endpoint,
        redis_url,
        stream,
        handlers=("recording:create_hanging_tick",),
        idle_interval=30.0,  # no periodic tick: only the last one
        handler_timeout=60.0,
    )
    prefix = keys.prefix(stream, "supersim-worker")
    client = redis.Redis.from_url(redis_url)
    stop = asyncio.Event()
    run = asyncio.create_task(
        run_worker(settings, until_caught_up=True, install_signals=False, stop=stop)
    )
    try:
        for _ in range(300):
            if client.exists(ticked_key(seen_key(prefix))) or run.done():
                break
            await asyncio.sleep(0.1)
        assert client.exists(ticked_key(seen_key(prefix))), "the last tick never started"
        with capture_logs() as logs:
            stop.set()
            summary = await asyncio.wait_for(run, 10)
        assert summary.caught_up
        assert [e for e in logs if e["event"] == "last_tick_cut_short"] == [
            {"event": "last_tick_cut_short", "started": True, "log_level": "warning"}
        ]
        left = {"recording": "its last tick was cut short by a stop"}
        assert summary.last_tick_incomplete == left
        assert [e["handlers"] for e in logs if e["event"] == "last_tick_incomplete"] == [left]
    finally:
        stop.set()
        await asyncio.gather(run, return_exceptions=True)
        client.close()
