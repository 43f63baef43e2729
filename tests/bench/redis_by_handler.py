"""Worker and Redis CPU per record of each built-in handler, end to end, run one at a time.

    python tests/bench/redis_by_handler.py [--sims 200] [--rounds 2] [--baseline DIR]
        [--sets log,metering ...]

Fills a 4-shard kinesalite stream with simulator records (as ``peer_bench`` does) and runs
our worker (``worker_probe.py run --from-start --until-caught-up``, 10,000 records a read)
over it with ``log`` alone, ``log`` and each handler, then all of them, each run in a
consumer group of its own; prints steady-state worker CPU (the run over an empty stream
taken off), redis-server CPU, and the worker's garbage collections' CPU per record, and
the worker's peak RSS. With ``--baseline DIR`` (a directory holding
another version's ``worker`` package, e.g. an unpacked ``git archive``) each run is followed
by the same run of that version (before it in every other round), for before/after pairs
measured side by side. A
development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
for _path in (REPO, REPO / "tests", BENCH_DIR):  # as run.py: worker, tests, benchmarks
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import redis  # noqa: E402
from kinesis_support import create_stream, put  # noqa: E402
from peer_bench import ALL_HANDLERS, our_env, run_child  # noqa: E402
from servers import start_kinesalite, start_redis  # noqa: E402

from worker.devtools.simulator import SimulationOptions, generate  # noqa: E402

HANDLER_SETS = ("log", "log,metering", "log,rejections", "log,data_limit", "log,attach_loops")


def print_commandstats(client: redis.Redis, records: int) -> None:
    """Redis's own time per command since the last reset, per record: the commands a script
    runs are counted under their own names as well as in the script's total."""
    stats = client.info("commandstats")
    rows = sorted(stats.items(), key=lambda item: -float(item[1]["usec"]))
    for name, row in rows:
        calls, usec = int(row["calls"]), float(row["usec"])
        if usec / records >= 0.01:
            print(
                f"|   | {name.removeprefix('cmdstat_')}: {calls / records:.3f} calls, "
                f"{usec / records:.2f} µs per record ({usec / max(calls, 1):.2f} µs a call) "
                "| | | |"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another version's worker, run too")
    parser.add_argument(
        "--sets", nargs="*", help="handler sets to run (default: each alone, then all)"
    )
    parser.add_argument(
        "--commandstats",
        action="store_true",
        help="after each run, Redis's own time per command (INFO commandstats), per record",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    records, _ = generate(SimulationOptions(sims=args.sims, hours=24, seed=7))
    kinesalite, redis_server = start_kinesalite(), start_redis()
    try:
        asyncio.run(create_stream(kinesalite.url, "full", shards=4))
        asyncio.run(create_stream(kinesalite.url, "empty", shards=4))
        asyncio.run(put(kinesalite.url, "full", records))
        client = redis.Redis.from_url(redis_server.url)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
        argv_ = [sys.executable, str(BENCH_DIR / "worker_probe.py")]
        argv_ += ["run", "--from-start", "--until-caught-up"]
        print(f"{len(records):,} records, {args.sims} SIMs over 24 h")
        print(
            "| handlers | worker | worker CPU µs per record | Redis CPU µs per record "
            "| of the worker's, garbage collection | peak RSS MiB |\n"
            "|---|---|---:|---:|---:|---:|"
        )
        versions: list[tuple[str, dict[str, str]]] = [("this", {})]
        if args.baseline:
            versions.append(("baseline", {"PYTHONPATH": str(args.baseline.resolve())}))
        run = 0
        for round_ in range(args.rounds):
            for handlers in args.sets or (*HANDLER_SETS, ALL_HANDLERS):
                # The order alternates by round: a run can leave the next one a warmer or
                # a fuller Redis.
                for version, extra in versions[:: -1 if round_ % 2 else 1]:
                    run += 1
                    env = our_env(
                        base, "empty", kinesalite.url, redis_server.url, f"e{run}", handlers
                    )
                    empty = run_child(argv_, {**env, **extra}, 0, client, kinesalite)
                    env = our_env(
                        base, "full", kinesalite.url, redis_server.url, f"f{run}", handlers
                    )
                    if args.commandstats:
                        client.config_resetstat()
                    full = run_child(argv_, {**env, **extra}, len(records), client, kinesalite)
                    worker = (full.cpu - empty.cpu) / len(records) * 1e6
                    per_redis = full.redis_cpu / len(records) * 1e6
                    per_gc = full.gc_cpu / len(records) * 1e6
                    print(
                        f"| `{handlers}` | {version} | {worker:.1f} | {per_redis:.2f} "
                        f"| {per_gc:.1f} | {full.max_rss_kib / 1024:.0f} |",
                        flush=True,
                    )
                    if args.commandstats:
                        print_commandstats(client, len(records))
        client.close()
    finally:
        kinesalite.stop()
        redis_server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
