"""Alerts live: worker processes read a stream while events are put as they happen.

Timestamps are near the wall clock; each event reaches the stream up to
``PUT_DELAY`` after its timestamp (less than ``UPSTREAM_DELAY``, the delay the settings
allow), some twice (also in the other vendor's envelope), on two shards, read by two
``supersim-worker run`` replicas of one group, which are caught up nearly all the time and
tick between events. Several seeds run side by side, each with its own stream. Every
episode of the reference model must be alerted exactly once, opened and resolved, with its
first and last hit and its count; nothing else may be alerted.

The windows are scaled down (seconds instead of minutes) so that a live run fits in the
suite; the rules do not depend on the scale. A soak at default settings, minutes long, is
``make soak``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from alerts_support import Episode, parse, reference
from events import make_record
from kinesis_support import create_stream, kinesis_client
from redis.asyncio import Redis

from worker import keys

# Alone: three replica processes under live load, with timing of its own to keep; run by
# itself (after the other files), neither starves nor is starved by a file beside it.
pytestmark = pytest.mark.alone

TESTS = Path(__file__).parent
SEEDS = (11, 12, 13)
THRESHOLD = 4
WINDOW_MS = 6_000
GRACE_S = 1
UPSTREAM_DELAY_S = 4
PUT_DELAY_MS = 3_000
"""Events reach the stream at most this long after their timestamp: less than
UPSTREAM_DELAY, more than QUIET_GRACE (as at the defaults, 60 s and 120 s)."""
SIMS = 6
LEAD_MS = 4_000
"""The first timestamp is this far after the test starts (worker start-up)."""
SPAN_MS = 24_000
"""Each SIM's events span about this long."""


@dataclass(frozen=True)
class Planned:
    sim: str
    seq: int
    ts_ms: int
    hit: bool


def plan(seed: int, start_ms: int) -> list[Planned]:
    """Each SIM: bursts of rejections, gaps shorter and longer than the window, a few
    accepted attaches (clears) among them."""
    rng = random.Random(seed)
    items: list[Planned] = []
    seq = 0
    for number in range(SIMS):
        sim = f"HS{seed:04d}{number:028d}"
        t = start_ms + rng.randrange(0, 2_000)
        while t < start_ms + SPAN_MS:
            for _ in range(rng.randint(2, 8)):
                seq += 1
                items.append(Planned(sim, seq, t, rng.random() >= 0.07))
                t += rng.randrange(150, 1_200)
            t += rng.choice([2_000, 4_000, 5_000, 7_500, 9_000, 12_000])
    return items


def record(item: Planned, vendor: str, as_string: bool) -> bytes:
    moment = datetime.fromtimestamp(item.ts_ms / 1000, UTC)
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{item.ts_ms % 1000:03d}Z"
    if item.hit:
        kind, extra = "attachment.rejected", {"error__code": 83705}
    else:
        kind, extra = "attachment.accepted", {}
    return make_record(
        kind,
        vendor,
        data_as_string=as_string,
        seq=item.seq,
        timestamp=stamp,
        time=stamp,
        sim_sid=item.sim,
        **extra,
    )


def deliveries(items: list[Planned], seed: int) -> list[tuple[int, bytes]]:
    """(wall ms to put it, record): each event once after a random upstream delay, a fifth
    of them a second time (either envelope), so order within a shard is not event order."""
    rng = random.Random(f"delivery/{seed}")
    out: list[tuple[int, bytes]] = []
    for item in items:
        copies = 2 if rng.random() < 0.2 else 1
        for _ in range(copies):
            vendor = "kore" if rng.random() < 0.3 else "twilio"
            raw = record(item, vendor, as_string=rng.random() < 0.2)
            out.append((item.ts_ms + rng.randrange(0, PUT_DELAY_MS), raw))
    return sorted(out, key=lambda pair: pair[0])


def expected(items: list[Planned]) -> dict[str, list[Episode]]:
    by_sim: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    for item in items:
        by_sim[item.sim].append((item.ts_ms, item.hit))
    found = {sim: reference(events, THRESHOLD, WINDOW_MS) for sim, events in by_sim.items()}
    return {sim: episodes for sim, episodes in found.items() if episodes}


def worker_env(endpoint: str, redis_url: str, stream: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    env.update(
        SUPERSIM_STREAM_NAME=stream,
        SUPERSIM_ENDPOINT_URL=endpoint,
        SUPERSIM_REDIS_URL=redis_url,
        SUPERSIM_HANDLERS="rejections",
        SUPERSIM_INITIAL_POSITION="TRIM_HORIZON",
        SUPERSIM_IDLE_INTERVAL="0.2",
        SUPERSIM_LEASE_TTL="5",
        SUPERSIM_LOG_FORMAT="json",
        SUPERSIM_ALERTS__SINKS="log,stream",
        SUPERSIM_ALERTS__QUIET_GRACE=str(GRACE_S),
        SUPERSIM_ALERTS__UPSTREAM_DELAY=str(UPSTREAM_DELAY_S),
        SUPERSIM_ALERTS__SHARD_WARMUP="1",
        SUPERSIM_ALERTS__THRESHOLDS__STORM_REJECTIONS=str(THRESHOLD),
        SUPERSIM_ALERTS__THRESHOLDS__STORM_WINDOW=str(WINDOW_MS / 1000),
    )
    return env


async def produce(endpoint: str, stream: str, planned: list[tuple[int, bytes]]) -> None:
    """Put each record at its time (random partition keys: both shards)."""
    async with kinesis_client(endpoint) as client:
        index = 0
        while index < len(planned):
            now_ms = time.time() * 1000
            due = []
            while index < len(planned) and planned[index][0] <= now_ms:
                due.append(planned[index][1])
                index += 1
            if due:
                response = await client.put_records(
                    StreamName=stream,
                    Records=[{"Data": raw, "PartitionKey": uuid.uuid4().hex} for raw in due],
                )
                assert not response.get("FailedRecordCount")
            elif index < len(planned):
                await asyncio.sleep(min(0.05, max(0.0, (planned[index][0] - now_ms) / 1000)))


async def alerts_of(redis_url: str, stream: str) -> list[dict[str, Any]]:
    client = Redis.from_url(redis_url)
    try:
        entries = await client.xrange(f"{keys.prefix(stream, 'supersim-worker')}:alerts")
    finally:
        await client.aclose()
    return [orjson.loads(fields[b"alert"]) for _, fields in entries]


def ms(text: str) -> int:
    return round(parse(text).timestamp() * 1000)


Found = dict[str, list[tuple[int, int, int, int]]]


def check_once(alerts: list[dict[str, Any]]) -> None:
    """Every alert id was opened once and resolved once."""
    statuses = Counter((a["id"], a["status"]) for a in alerts)
    assert all(count == 1 for count in statuses.values()), statuses
    opened = {a["id"] for a in alerts if a["status"] == "open"}
    assert {a["id"] for a in alerts if a["status"] == "resolved"} == opened


def as_found(alerts: list[dict[str, Any]]) -> Found:
    """Per SIM, each resolved storm as (first, last, count, opened)."""
    resolved = [a for a in alerts if a["status"] == "resolved"]
    found: Found = defaultdict(list)
    for alert in sorted(resolved, key=lambda a: a["first_seen"]):
        assert alert["kind"] == "rejection_storm", alert
        found[alert["subject"].removeprefix("sim:")].append(
            (
                ms(alert["first_seen"]),
                ms(alert["last_seen"]),
                alert["count"],
                ms(alert["opened_at"]),
            )
        )
    return dict(found)


async def run_seed(endpoint: str, redis_url: str, seed: int, logs: Path) -> None:
    stream = f"live-{seed}-{uuid.uuid4().hex[:6]}"
    await create_stream(endpoint, stream, shards=2)
    env = worker_env(endpoint, redis_url, stream)
    start_ms = round(time.time() * 1000) + LEAD_MS
    items = plan(seed, start_ms)
    truth = expected(items)
    assert sum(map(len, truth.values())) >= 4, "a seed that makes too few storms"
    replicas = []
    for number in range(2):
        log = (logs / f"{stream}-{number}.log").open("wb")
        replicas.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "run", env=env, stdout=log, stderr=log
            )
        )
    try:
        await produce(endpoint, stream, deliveries(items, seed))
        last_ms = max(item.ts_ms for item in items)
        # The last storm closes once the wall clock minus the upstream delay has passed
        # its last hit by the window and the grace.
        closes_at = last_ms + WINDOW_MS + (GRACE_S + UPSTREAM_DELAY_S) * 1000
        deadline = closes_at / 1000 + 30
        want = {
            sim: [(e.first, e.last, e.count, e.opened) for e in eps] for sim, eps in truth.items()
        }
        found: Found = {}
        alerts: list[dict[str, Any]] = []
        while time.time() < deadline:
            await asyncio.sleep(0.5)
            alerts = await alerts_of(redis_url, stream)
            found = as_found(alerts)
            if time.time() * 1000 > closes_at and found == want:
                break
        assert found == want, f"seed {seed}: logs in {logs}"
        check_once(alerts)
        for replica in replicas:
            assert replica.returncode is None, "a replica stopped"
    finally:
        for replica in replicas:
            with contextlib.suppress(ProcessLookupError):
                replica.terminate()
        for replica in replicas:
            try:
                await asyncio.wait_for(replica.wait(), timeout=15)
            except TimeoutError:
                replica.kill()
                await replica.wait()


async def test_live_replicas_alert_each_storm_once(
    kinesalite_endpoint: str, redis_url: str, tmp_path: Path
) -> None:
    """Two live replicas, events delayed upstream within the allowed delay, duplicates in
    both envelopes: each seed's storms are exactly the reference model's."""
    await asyncio.gather(
        *(run_seed(kinesalite_endpoint, redis_url, seed, tmp_path) for seed in SEEDS)
    )
