"""Where our worker's CPU goes per record: ``run`` with the ``log`` handler under py-spy.

    python tests/bench/profile_consumer.py [--sims 560] [--rate 200] [--py-spy PATH]
        [--handlers log,metering,rejections,data_limit,attach_loops]

Fills a 4-shard kinesalite stream with simulator records (as ``peer_bench`` does), runs
``worker_probe.py run --from-start --until-caught-up`` under ``py-spy record --format raw``
(py-spy from PyPI: ``pip install py-spy``, in any virtualenv; pass its path or put it on
PATH) and sorts every sample into one step of the way a record goes, by the innermost
frame that names one (see ``STEPS``). Prints each step's share of the samples and its CPU
per record (that share of the child's CPU, divided by the records), then the functions
with the most samples of their own. A development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import orjson

BENCH_DIR: Final = Path(__file__).resolve().parent
REPO: Final = BENCH_DIR.parents[1]
_PARSER: Final = "worker/consumer/kinesis_parser.py"


def _line_of(path: str, needle: str) -> str:
    """``path:N`` of the first line of a worker source file holding ``needle``."""
    source = (REPO / path).read_text().splitlines()
    number = next(i for i, line in enumerate(source, start=1) if needle in line)
    return f"{path}:{number})"


STEPS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    # (step, substrings of a py-spy frame "function (path:line)"); the first match wins,
    # looking from the innermost frame outwards.
    ("start-up: imports", ("<frozen importlib", "importlib/__init__")),
    ("garbage collection (with --native)", ("gc_collect",)),
    ("waiting (py-spy's GIL guess)", ("concurrent/futures/thread.py:81)",)),
    (
        "arrival timestamps",
        (_line_of(_PARSER, "self._parsed = self._parse(raw)"), "utc_timestamp ("),
    ),
    ("GetRecords body: msgspec, base64 included", (_PARSER,)),
    ("decode (worker.events: orjson, pydantic)", ("worker/events/",)),
    ("log handler + structlog", ("worker/handlers/log.py", "structlog/", "worker/logs.py")),
    ("metering handler", ("worker/handlers/metering/",)),
    ("alert handlers", ("worker/handlers/alerts/", "worker/alerts/")),
    ("other handlers", ("worker/handlers/",)),
    ("Redis (redis-py)", ("redis/",)),
    ("HTTP (aiohttp)", ("aiohttp/", "yarl/", "multidict/")),
    ("botocore request/response machinery", ("botocore/", "aiobotocore/")),
    (
        "checkpoints, leases, balance",
        ("checkpoints.py", "leases.py", "lease_keeper.py", "balance.py", "positions.py"),
    ),
    ("pipeline, shard reader, supervisor", ("worker/consumer/",)),
    ("metrics (prometheus-client)", ("prometheus_client/", "worker/metrics.py")),
    ("settings, CLI", ("pydantic_settings/", "worker/settings.py", "worker/cli/")),
    ("event loop (asyncio)", ("asyncio/",)),
)


def step_of(frames: Sequence[str]) -> str:
    """The step a stack (outermost frame first) is charged to."""
    for step, patterns in STEPS[:3]:  # wherever they are in the stack
        if any(pattern in frame for frame in frames for pattern in patterns):
            return step
    for frame in reversed(frames):
        for step, patterns in STEPS[3:]:
            if any(pattern in frame for pattern in patterns):
                return step
    return "other"


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw output: ``frame;frame;...;frame COUNT`` per line, outermost first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sims", type=int, default=560, help="simulated SIMs (560: ~100k)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--py-spy", dest="py_spy", default=shutil.which("py-spy"))
    parser.add_argument("--top", type=int, default=15, help="functions listed by own samples")
    parser.add_argument("--keep", type=Path, help="also copy py-spy's raw stacks here")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every running thread, not only the one holding the GIL (py-spy --gil)",
    )
    parser.add_argument(
        "--handlers", default="log", help="SUPERSIM_HANDLERS of the run (default: log)"
    )
    parser.add_argument("extra", nargs="*", help="more py-spy options, after --")
    args = parser.parse_args(argv)
    if not args.py_spy:
        parser.error("py-spy not found: pip install py-spy, then pass --py-spy PATH")
    for path in (REPO, REPO / "tests", BENCH_DIR):  # as run.py: worker, tests, benchmarks
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from kinesis_support import create_stream, put
    from peer_bench import our_env
    from servers import start_kinesalite, start_redis

    from worker.devtools.simulator import SimulationOptions, generate

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    records, _ = generate(SimulationOptions(sims=args.sims, hours=24, seed=7))
    kinesalite, redis_server = start_kinesalite(), start_redis()
    try:
        asyncio.run(create_stream(kinesalite.url, "profile", shards=4))
        asyncio.run(put(kinesalite.url, "profile", records))
        with tempfile.TemporaryDirectory() as tmp:
            stacks_path, marks_path = Path(tmp) / "stacks.txt", Path(tmp) / "marks.json"
            env = our_env(
                dict(os.environ), "profile", kinesalite.url, redis_server.url, "p", args.handlers
            )
            command = [sys.executable, str(BENCH_DIR / "worker_probe.py"), str(marks_path)]
            command += ["run", "--from-start", "--until-caught-up"]
            cpu = _child_cpu()
            spy = [args.py_spy, "record", "--format", "raw", "--rate", str(args.rate)]
            spy += [] if args.all_threads else ["--gil"]
            spy += [*args.extra, "--output", str(stacks_path), "--"]
            subprocess.run(
                [*spy, *command],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )
            cpu = _child_cpu() - cpu  # py-spy and the worker: py-spy's own share is small
            worker_cpu = orjson.loads(marks_path.read_bytes())["exit"][0]
            stacks = read_stacks(stacks_path)
            if args.keep:
                shutil.copy(stacks_path, args.keep)
    finally:
        kinesalite.stop()
        redis_server.stop()
    count = len(records)
    total = sum(stacks.values())
    steps: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for stack, samples in stacks.items():
        steps[step_of(stack)] += samples
        own[stack[-1]] += samples
    print(
        f"{count:,} records; worker CPU {worker_cpu:.2f} s ({worker_cpu / count * 1e6:.1f} µs "
        f"per record; with py-spy {cpu:.2f} s); {total:,} samples at {args.rate}/s\n"
    )
    print("| step | share | µs per record |\n|---|---:|---:|")
    for step, samples in steps.most_common():
        share = samples / total
        print(f"| {step} | {share:.1%} | {share * worker_cpu / count * 1e6:.1f} |")
    print(f"\nfunctions by own samples (top {args.top}):")
    for frame, samples in own.most_common(args.top):
        print(f"  {samples / total:6.1%}  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
