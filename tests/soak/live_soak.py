"""Live soak of the alert handlers at default settings (``make soak``; minutes, not a test).

For each seed: a simulated fleet whose period starts now (``--start now``), put into its own
kinesalite stream (4 shards) as it happens: every record reaches the stream a random
0-``--put-delay`` seconds after its event time (below the default ``UPSTREAM_DELAY`` of
120 s and above the default ``QUIET_GRACE`` of 60 s, so shards deliver out of order),
with the simulator's duplicates and both vendors' envelopes. ``--replicas`` processes of
``supersim-worker run`` (one consumer group per seed, every alert handler, default alert
settings) read it live. After the period, the soak waits until every episode can have
closed (storm window 5 min + grace 1 min + upstream delay 2 min), then checks the alerts
against the simulator's truth: each episode opened exactly once and resolved at most once
(resolved unless it lasts to the end), with the truth's first and last event and count
for storms, and nothing else alerted.

    python tests/soak/live_soak.py --seeds 1,2,3 --sims 300 --minutes 20 --replicas 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from alerts_support import fleet_subject, match, parse, sim_subject  # noqa: E402
from kinesis_support import create_stream, kinesis_client  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from servers import start_kinesalite, start_redis  # noqa: E402

from worker import keys  # noqa: E402
from worker.devtools.simulator import SimulationOptions, generate  # noqa: E402

CLOSE_MARGIN_S = 5 * 60 + 60 + 120 + 60
"""After the period: storm window, quiet grace, upstream delay, and a minute to spare."""


def event_ms(raw: bytes) -> int:
    envelope = orjson.loads(raw)
    data = envelope["data"]
    if isinstance(data, str):
        data = orjson.loads(data)
    stamp = data.get("timestamp") or envelope["time"]
    return round(parse(stamp).timestamp() * 1000)


def schedule(records: list[bytes], seed: int, put_delay: float) -> list[tuple[int, bytes]]:
    rng = random.Random(f"soak/{seed}")
    timed = [(event_ms(raw) + rng.randrange(0, int(put_delay * 1000)), raw) for raw in records]
    return sorted(timed, key=lambda pair: pair[0])


async def produce(endpoint: str, stream: str, planned: list[tuple[int, bytes]]) -> None:
    async with kinesis_client(endpoint) as client:
        index = 0
        while index < len(planned):
            now_ms = time.time() * 1000
            due = []
            while index < len(planned) and planned[index][0] <= now_ms and len(due) < 500:
                due.append(planned[index][1])
                index += 1
            if due:
                response = await client.put_records(
                    StreamName=stream,
                    Records=[{"Data": raw, "PartitionKey": uuid.uuid4().hex} for raw in due],
                )
                if response.get("FailedRecordCount"):
                    raise RuntimeError(f"{stream}: PutRecords failed: {response}")
            else:
                await asyncio.sleep(min(0.2, max(0.0, (planned[index][0] - now_ms) / 1000)))


def worker_env(endpoint: str, redis_url: str, stream: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        SUPERSIM_STREAM_NAME=stream,
        SUPERSIM_ENDPOINT_URL=endpoint,
        SUPERSIM_REDIS_URL=redis_url,
        SUPERSIM_HANDLERS="rejections,attach_loops,data_limit",
        SUPERSIM_INITIAL_POSITION="TRIM_HORIZON",
        SUPERSIM_LOG_FORMAT="json",
        SUPERSIM_ALERTS__SINKS="log,stream",
    )
    return env


def check(alerts: list[dict[str, Any]], truth: dict[str, Any]) -> list[str]:
    """What differs from the truth (empty when the alerts are exactly its episodes)."""
    problems: list[str] = []
    statuses = Counter((a["id"], a["status"]) for a in alerts)
    problems += [f"{key} written {n} times" for key, n in statuses.items() if n > 1]
    checks = [
        ("rejection_storm", truth["rejection_storms"], sim_subject),
        ("fleet_network_rejections", truth["fleet_rejection_episodes"], fleet_subject),
        ("attach_loop", truth["attach_loops"], sim_subject),
        ("data_limit_reached", truth["data_limit_episodes"], sim_subject),
    ]
    for kind, episodes, subject in checks:
        matched = match(alerts, kind, episodes, subject)
        problems += [f"{kind}: {ep} alerted {n} times" for ep, n in matched.not_exactly_once]
        problems += [f"{kind}: extra alert {a}" for a in matched.extra]
        if kind != "rejection_storm":
            continue
        for episode, found in matched.found:
            if len(found) != 1:
                continue
            alert = found[0]
            if alert["status"] != "resolved" or alert["count"] != episode["count"]:
                problems.append(f"{kind}: {episode} became {alert}")
    return problems


async def run_seed(args: argparse.Namespace, endpoint: str, redis_url: str, seed: int) -> bool:
    stream = f"soak-{seed}-{uuid.uuid4().hex[:6]}"
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=10)
    options = SimulationOptions(
        sims=args.sims,
        hours=args.minutes / 60,
        seed=seed,
        start=start,
        duplicate_share=0.1,
        kore_share=0.3,
        data_as_string_share=0.1,
        attach_loop_share=0.05,
    )
    records, truth = generate(options)
    await create_stream(endpoint, stream, shards=4)
    env = worker_env(endpoint, redis_url, stream)
    logs = Path(args.logs)
    replicas = []
    for number in range(args.replicas):
        log = (logs / f"{stream}-{number}.log").open("wb")
        replicas.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "run", env=env, stdout=log, stderr=log
            )
        )
    try:
        await produce(endpoint, stream, schedule(records, seed, args.put_delay))
        end = start + timedelta(minutes=args.minutes)
        wait = end.timestamp() + args.close_margin - time.time()
        await asyncio.sleep(max(0.0, wait))
        client = Redis.from_url(redis_url)
        try:
            entries = await client.xrange(f"{keys.prefix(stream, 'supersim-worker')}:alerts")
        finally:
            await client.aclose()
        alerts = [orjson.loads(fields[b"alert"]) for _, fields in entries]
        problems = check(alerts, truth)
        kinds = Counter(a["kind"] for a in alerts if a["status"] == "open")
        episodes = {
            name: len(truth[name])
            for name in (
                "rejection_storms",
                "fleet_rejection_episodes",
                "attach_loops",
                "data_limit_episodes",
            )
        }
        print(
            f"seed {seed}: {len(records)} records, truth {episodes}, alerts opened "
            f"{dict(kinds)}: {'EXACT' if not problems else f'{len(problems)} problems'}",
            flush=True,
        )
        for problem in problems[:20]:
            print(f"  {problem}", flush=True)
        return not problems
    finally:
        for replica in replicas:
            with contextlib.suppress(ProcessLookupError):
                replica.terminate()
        for replica in replicas:
            await replica.wait()


async def main(args: argparse.Namespace) -> int:
    redis = start_redis()
    kinesalite = start_kinesalite()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        results = await asyncio.gather(
            *(run_seed(args, kinesalite.url, redis.url, seed) for seed in seeds)
        )
    finally:
        kinesalite.stop()
        redis.stop()
    print(f"{sum(results)} of {len(results)} seeds exact (logs in {args.logs})")
    return 0 if all(results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--sims", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--put-delay", type=float, default=100.0)
    parser.add_argument("--close-margin", type=float, default=CLOSE_MARGIN_S)
    parser.add_argument("--logs", default=tempfile.mkdtemp(prefix="soak-"))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    sys.exit(asyncio.run(main(parser.parse_args())))
