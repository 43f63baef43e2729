"""Memory under backlog: the worker's peak RSS while it drains a 100k and a 1M record backlog.

For each size a fresh kinesalite holds a 4-shard stream filled with that many connection
event records (every kind in turn, distinct event ids and SIMs), put shard by shard with
``ExplicitHashKey`` so the four fills overlap. The worker then runs as a subprocess,
``run --from-start --until-caught-up`` with the ``log`` handler and the largest batches
(``SUPERSIM_BATCH_LIMIT=10000``, prefetch at its default), until it has read all of it.
Its peak RSS is the kernel's high-water mark for that child (``wait4``'s ``ru_maxrss``);
its RSS is also sampled from ``/proc`` while it runs, to give the RSS once a quarter of
the records are read (start-up and the first batches behind it) beside the peak.

Read-ahead is bounded per shard (``SUPERSIM_PREFETCH_BATCHES`` batches queued, one being
handed over, one being handled), so the peak should not depend on how much waits: the
goal (issue 14) is a 1M backlog's peak within 20 % of a 100k backlog's. With
``BACKLOG_BENCH_BASELINE`` set, another version's worker reads each backlog too.

The ``leases`` variant (not part of ``make bench``) drains one backlog at the default lease
TTL while busy processes load the machine, and counts the records read again after leases
were lost, with the longest stalls of the worker's event loop (``loop_probe.py``)::

    PYTHONPATH=tests python tests/bench/backlog_bench.py leases [--records N] [--ttl 8]
        [--burners 8] [--rounds 2] [--baseline DIR [--baseline-only]]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from events import KINDS, make_record
from kinesis_support import create_stream, kinesis_client
from servers import start_kinesalite, start_redis

KEY = "backlog"
TITLE = "Memory under backlog: the worker's peak RSS, 100k against 1M records"
SHARDS = 4
SIZES = (100_000, 1_000_000)
QUICK_SIZES = (10_000, 100_000)
GOAL = 1.20
"""The larger backlog's peak RSS at most this many times the smaller's."""
PUT_BATCH = 500
"""Records per PutRecords call (the most Kinesis takes)."""
SAMPLE_EVERY = 0.1
"""Seconds between RSS samples of the running worker."""
REPO = Path(__file__).resolve().parents[2]
BASELINE_VARIABLE = "BACKLOG_BENCH_BASELINE"
"""Names a directory holding another version's ``worker`` package (an unpacked
``git archive``): its worker then drains every backlog too, right before this tree's, for
before/after figures from one run over the same records."""


@dataclass(frozen=True, slots=True)
class Drain:
    tree: str
    records: int
    put_seconds: float
    wall_seconds: float
    peak_rss_mib: float
    quarter_rss_mib: float
    """RSS at the first sample after a quarter of the records were handled."""


def records_for(shard: int, count: int) -> Iterator[bytes]:
    """The ``count`` records put on shard number ``shard`` (of ``SHARDS``), every kind in
    turn, each with its own event id and one of 997 SIMs."""
    for i in range(count):
        seq = i * SHARDS + shard
        yield make_record(
            KINDS[seq % len(KINDS)], seq=seq, fields={"data.sim_sid": f"HS{seq % 997:032x}"}
        )


async def fill(endpoint: str, stream: str, total: int) -> None:
    """Put ``total`` records, a quarter on each shard, the shards' puts concurrently."""
    async with kinesis_client(endpoint) as client:
        listed = await client.list_shards(StreamName=stream)
        hash_keys = [s["HashKeyRange"]["StartingHashKey"] for s in listed["Shards"]]
        assert len(hash_keys) == SHARDS, listed

        async def put_shard(shard: int, count: int) -> None:
            chunk: list[dict[str, Any]] = []
            for raw in records_for(shard, count):
                chunk.append(
                    {"Data": raw, "PartitionKey": "k", "ExplicitHashKey": hash_keys[shard]}
                )
                if len(chunk) == PUT_BATCH:
                    await _put(client, stream, chunk)
                    chunk = []
            if chunk:
                await _put(client, stream, chunk)

        share, extra = divmod(total, SHARDS)
        await asyncio.gather(
            *(put_shard(shard, share + (shard < extra)) for shard in range(SHARDS))
        )


async def _put(client: Any, stream: str, chunk: list[dict[str, Any]]) -> None:
    response = await client.put_records(StreamName=stream, Records=chunk)
    if response.get("FailedRecordCount"):
        raise SystemExit(f"kinesalite refused {response['FailedRecordCount']} records")


def _rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def _handled(log_path: Path) -> int:
    """Events the log handler has logged so far (its ``batch`` lines)."""
    return sum(
        orjson.loads(line).get("events", 0)
        for line in log_path.read_bytes().splitlines()
        if b'"event":"batch"' in line
    )


def _trouble(log_path: Path) -> Counter[str]:
    """How many times the worker logged each warning or error event."""
    found: Counter[str] = Counter()
    for line in log_path.read_bytes().splitlines():
        if b'"level":"warning"' in line or b'"level":"error"' in line:
            found[orjson.loads(line).get("event", "?")] += 1
    return found


def measure(total: int, env: dict[str, str], cwd: Path) -> tuple[float, float, float]:
    """Run the worker of the tree at ``cwd`` over the backlog until it has read it all:
    (wall seconds, peak RSS MiB, RSS MiB once a quarter of ``total`` was handled)."""
    wall, peak, quarter, handled, trouble = _drain(total, env, cwd)
    if handled != total:
        raise SystemExit(
            f"worker handled {handled} events of {total} records; its warnings and errors: "
            f"{dict(trouble)}"
        )
    return wall, peak, quarter


def _drain(
    total: int, env: dict[str, str], cwd: Path, argv: list[str] | None = None
) -> tuple[float, float, float, int, Counter[str]]:
    """Run the worker (``argv`` before its ``run`` arguments: ``python -m worker`` unless
    given) until it stops: (wall seconds, peak RSS MiB, RSS MiB once a quarter of ``total``
    was handled, events handled, warnings and errors logged by event)."""
    command = argv or [sys.executable, "-m", "worker"]
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "worker.log"
        with log_path.open("wb") as log:
            started = time.perf_counter()
            child = subprocess.Popen(
                [*command, "run", "--from-start", "--until-caught-up"],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
            quarter: float | None = None
            while True:
                # wait4, not poll(): it gives this child's own rusage, whose ru_maxrss is
                # the kernel's high-water mark of its RSS.
                pid, status, usage = os.wait4(child.pid, os.WNOHANG)
                if pid:
                    break
                rss = _rss_mib(child.pid)
                if quarter is None and rss is not None and _handled(log_path) >= total / 4:
                    quarter = rss
                time.sleep(SAMPLE_EVERY)
            wall = time.perf_counter() - started
            child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"worker failed:\n{log_path.read_text()[-3000:]}")
        handled, trouble = _handled(log_path), _trouble(log_path)
    # ru_maxrss: KiB on Linux
    return wall, usage.ru_maxrss / 1024, quarter or float("nan"), handled, trouble


def drain(total: int, trees: dict[str, Path]) -> list[Drain]:
    """Fill a fresh stream with ``total`` records; the worker of each tree (name → the
    directory holding its ``worker`` package) reads it all, as a consumer group of its own."""
    kinesalite = start_kinesalite()
    redis = start_redis()
    try:
        stream = "backlog"
        asyncio.run(create_stream(kinesalite.url, stream, shards=SHARDS))
        started = time.perf_counter()
        asyncio.run(fill(kinesalite.url, stream, total))
        put_seconds = time.perf_counter() - started
        drains = []
        for name, tree in trees.items():
            # A lease longer than the default: this benchmark measures memory, whatever the
            # machine's load does to the event loop (``leases`` measures that).
            env = _env(stream, f"backlog-{name.replace(' ', '-')}", kinesalite.url, redis.url, 30)
            wall, peak, quarter = measure(total, env, tree)
            drains.append(Drain(name, total, put_seconds, wall, peak, quarter))
    finally:
        kinesalite.stop()
        redis.stop()
    return drains


def _env(stream: str, group: str, endpoint: str, redis_url: str, ttl: int) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")},
        "SUPERSIM_STREAM_NAME": stream,
        "SUPERSIM_CONSUMER_GROUP": group,
        "SUPERSIM_ENDPOINT_URL": endpoint,
        "SUPERSIM_REDIS_URL": redis_url,
        "SUPERSIM_HANDLERS": "log",
        "SUPERSIM_LOG_FORMAT": "json",
        "SUPERSIM_BATCH_LIMIT": "10000",
        "SUPERSIM_IDLE_INTERVAL": "0.2",
        "SUPERSIM_LEASE_TTL": str(ttl),
    }


# --- leases under load: ``python backlog_bench.py leases`` -------------------------------------

LEASE_EVENTS: Final = ("lease_unconfirmed", "lease_lost", "shard_reader_failed")


@dataclass(frozen=True, slots=True)
class LeaseDrain:
    tree: str
    wall_seconds: float
    handled: int
    trouble: Counter[str]
    stalls: dict[str, Any]
    """What ``loop_probe.py`` wrote: callbacks over each bound, the longest ones."""


def leases(total: int, trees: dict[str, Path], ttl: int, burners: int, rounds: int) -> str:
    """Drain one backlog of ``total`` records ``rounds`` times with each tree's worker (in
    turn, the order alternating, each drain a consumer group of its own) at lease TTL
    ``ttl``, while ``burners`` busy processes load the machine, the worker's event loop
    watched by ``loop_probe.py``; a markdown table of records read again, lease warnings
    and the longest loop stalls."""
    kinesalite = start_kinesalite()
    redis = start_redis()
    burning: list[subprocess.Popen[bytes]] = []
    drains: list[LeaseDrain] = []
    try:
        stream = "leases"
        asyncio.run(create_stream(kinesalite.url, stream, shards=SHARDS))
        asyncio.run(fill(kinesalite.url, stream, total))
        busy = [sys.executable, "-c", "while True: pass"]
        burning += [subprocess.Popen(busy) for _ in range(burners)]
        names = list(trees)
        for number in range(rounds):
            for name in names if number % 2 == 0 else names[::-1]:
                tree = trees[name]
                group = f"leases-{number}-{name.replace(' ', '-')}"
                env = _env(stream, group, kinesalite.url, redis.url, ttl)
                env["PYTHONPATH"] = str(tree)
                with tempfile.TemporaryDirectory() as tmp:
                    stalls_path = Path(tmp) / "stalls.json"
                    argv = [sys.executable, str(Path(__file__).with_name("loop_probe.py"))]
                    print(f"round {number + 1}/{rounds}: {name}", file=sys.stderr, flush=True)
                    wall, _, _, handled, trouble = _drain(
                        total, env, tree, [*argv, str(stalls_path)]
                    )
                    stalls = orjson.loads(stalls_path.read_bytes())
                drains.append(LeaseDrain(name, wall, handled, trouble, stalls))
    finally:
        for process in burning:
            process.kill()
            process.wait()
        kinesalite.stop()
        redis.stop()
    rows = "".join(
        f"| {d.tree} | {d.wall_seconds:.1f} | {d.handled - total:,} "
        f"({(d.handled - total) / total:.1%}) "
        + "".join(f"| {d.trouble[event]} " for event in LEASE_EVENTS)
        + f"| {d.stalls['longest'][0][0] if d.stalls['longest'] else 0:.2f} "
        f"| {d.stalls['over']['0.25']} | {d.stalls['over']['1.0']} |\n"
        for d in drains
    )
    heads = "".join(f"| `{event}` " for event in LEASE_EVENTS)
    longest = "".join(
        f"- {d.tree}: "
        + "; ".join(f"{s:.2f} s {what}" for s, what in d.stalls["longest"][:3])
        + f"; {d.stalls.get('full_collections', '?')} full garbage collections, the longest "
        f"{d.stalls.get('longest_full_collection', float('nan')):.2f} s\n"
        for d in drains
    )
    return (
        f"{total:,} records on {SHARDS} shards, `SUPERSIM_LEASE_TTL={ttl}` (renewed every "
        f"{ttl / 4:g} s), `SUPERSIM_BATCH_LIMIT=10000`, {burners} busy processes beside it.\n\n"
        f"| worker | drain wall s | records read again {heads}| longest loop stall s "
        "| stalls ≥ 0.25 s | stalls ≥ 1 s |\n"
        f"|---|---:|---:{'|---:' * len(LEASE_EVENTS)}|---:|---:|---:|\n{rows}\n"
        f"Longest callbacks:\n\n{longest}"
    )


def _main() -> None:
    parser = argparse.ArgumentParser(description="Leases under load while a backlog drains.")
    parser.add_argument("command", choices=["leases"])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--ttl", type=int, default=8)
    parser.add_argument("--burners", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="a directory holding another `worker`")
    parser.add_argument("--baseline-only", action="store_true", help="only the baseline")
    parser.add_argument("--this", type=Path, default=REPO, help="this tree's `worker` (a copy)")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    trees = {} if args.baseline_only else {"this tree": args.this.resolve()}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    print(leases(args.records, trees, args.ttl, args.burners, args.rounds))


def run(quick: bool = False) -> str:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    trees = {"this tree": REPO}
    baseline = os.environ.get(BASELINE_VARIABLE)
    if baseline:
        trees = {"baseline": Path(baseline).resolve(), **trees}
    small, large = QUICK_SIZES if quick else SIZES
    drains = drain(small, trees) + drain(large, trees)
    ratios = {
        name: next(d for d in drains if d.tree == name and d.records == large).peak_rss_mib
        / next(d for d in drains if d.tree == name and d.records == small).peak_rss_mib
        for name in trees
    }
    rows = "".join(
        f"| {d.tree} | {d.records:,} | {d.put_seconds:.1f} | {d.wall_seconds:.1f} "
        f"| {d.records / d.wall_seconds:,.0f} | {d.quarter_rss_mib:.1f} | {d.peak_rss_mib:.1f} |\n"
        for d in sorted(drains, key=lambda d: (d.tree != "baseline", d.records))
    )
    ratio = ratios["this tree"]
    verdict = "met" if ratio <= GOAL else "not met"
    others = "".join(
        f" The baseline (`{BASELINE_VARIABLE}`), drained the same backlogs in the same run: "
        f"{value:.2f}."
        for name, value in ratios.items()
        if name != "this tree"
    )
    return (
        f"A {SHARDS}-shard kinesalite stream per size (a fresh server each), filled with "
        "connection event records of every kind in turn (1.0 to 1.5 KB), then read by "
        "`supersim-worker run --from-start --until-caught-up` as a subprocess with "
        "`SUPERSIM_HANDLERS=log`, `SUPERSIM_BATCH_LIMIT=10000`, the default "
        "`SUPERSIM_PREFETCH_BATCHES` (2), `SUPERSIM_LEASE_TTL=30`, JSON logs to a file. "
        "Peak RSS is the worker's high-water mark (`wait4`'s `ru_maxrss`); \"RSS at ¼\" is "
        "its RSS when a quarter of the records had been handled.\n\n"
        "| worker | backlog (records) | fill s | drain wall s | records/s | RSS at ¼ MiB "
        "| peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n"
        f"**Peak RSS {large:,} / {small:,} = {ratio:.2f}** (goal ≤ {GOAL:.2f}: {verdict})."
        f"{others}\n"
    )


if __name__ == "__main__":
    _main()
