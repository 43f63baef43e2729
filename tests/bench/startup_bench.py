"""Start-up: process CPU of short ``supersim-worker`` commands, from exec to exit.

Each command runs as a child process (the installed ``supersim-worker`` script beside this
interpreter, else ``python -m worker``), interleaved with the others, ``REPEATS`` times;
its CPU is the child's user+system time (``RUSAGE_CHILDREN``), so interpreter start-up and
every import count. ``usage`` and ``dlq list`` run for real against a throwaway
redis-server holding a few dead letters, so they also connect, read and print.
``python -c pass`` is the floor; two more rows import only the libraries those commands
cannot do without (redis-py, then with structlog and pydantic-settings), the floor of any
command that reads the settings and Redis.

The worker's modules are byte-compiled first (``compileall``), as the image is at build
(``deploy/Dockerfile``) and as pip does on installing a wheel, so no row pays for compiling
the project's source: with ``PYTHONDONTWRITEBYTECODE`` set and an editable install, every
start would, and that is no deployment's start-up.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import redis as redis_py
from servers import start_redis

import worker
from worker import keys

KEY = "startup"
TITLE = "Start-up: CPU of short commands"
REPEATS = 9
GOAL_SECONDS = 0.3
GOAL_COMMANDS = ("--help", "usage --sim HS00 --stream bench", "dlq list")
"""The commands issue 14 gives a start-up goal (at most ``GOAL_SECONDS`` of CPU)."""

DEAD_LETTERS = 5
"""Entries put in the dead-letter store ``dlq list`` reads."""
LIBRARIES: dict[str, str] = {
    "python -c 'import redis'": "import redis",
    "python -c 'import redis, structlog, pydantic_settings'": (
        "import redis, structlog, pydantic_settings"
    ),
}
"""The libraries ``usage`` and ``dlq list`` need, imported alone: what is left to them."""

COMMANDS: tuple[str, ...] = (
    "--help",
    "--version",
    "run --help",
    "dlq list --help",
    "usage --help",
    "decode --help",
    "usage --sim HS00 --stream bench",
    "dlq list",
)


def _program() -> list[str]:
    script = Path(sys.executable).parent / "supersim-worker"
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker"]


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(argv: Sequence[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of ``argv``; raises if it fails."""
    before = _child_cpu()
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr.decode()}")
    return _child_cpu() - before, wall


def _dead_letters(url: str, stream: str) -> None:
    """Put ``DEAD_LETTERS`` entries, shaped as the worker writes them, in the store of
    ``stream`` and the default consumer group."""
    key = keys.dead_letters(keys.prefix(stream, "supersim-worker"))
    client = redis_py.Redis.from_url(url)
    try:
        for n in range(DEAD_LETTERS):
            client.xadd(
                key,
                {
                    "raw": b'{"not": "an event"}',
                    "shard_id": "shardId-000000000000",
                    "sequence_number": str(49_000_000 + n),
                    "partition_key": "HS00",
                    "arrival": "2026-01-01T00:00:00+00:00",
                    "reason": "missing field: type",
                    "handler": "decode",
                    "exception": "",
                    "dead_lettered_at": "2026-01-01T00:00:01+00:00",
                },
            )
    finally:
        client.close()


def compile_worker() -> None:
    """Byte-compile the ``worker`` package in place (``__pycache__``, as pip does for a wheel)."""
    package = Path(worker.__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def run(quick: bool = False) -> str:
    repeats = 3 if quick else REPEATS
    program = _program()
    compile_worker()
    redis = start_redis()
    _dead_letters(redis.url, "bench")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")},
        "SUPERSIM_REDIS_URL": redis.url,
        "SUPERSIM_STREAM_NAME": "bench",
    }
    argvs = {"python -c pass": [sys.executable, "-c", "pass"]}
    argvs |= {name: [sys.executable, "-c", code] for name, code in LIBRARIES.items()}
    argvs |= {command: [*program, *command.split()] for command in COMMANDS}
    cpu: dict[str, list[float]] = {name: [] for name in argvs}
    wall: dict[str, list[float]] = {name: [] for name in argvs}
    try:
        for _ in range(repeats):
            for name, argv in argvs.items():
                seconds, elapsed = measure(argv, env)
                cpu[name].append(seconds)
                wall[name].append(elapsed)
    finally:
        redis.stop()
    shown = " ".join(Path(part).name if i == 0 else part for i, part in enumerate(program))
    rows = "".join(
        f"| `{name if name.startswith('python') else f'{shown} {name}'}` "
        f"| {statistics.median(cpu[name]):.3f} | {min(cpu[name]):.3f} "
        f"| {statistics.median(wall[name]):.3f} |\n"
        for name in argvs
    )
    worst = max(statistics.median(cpu[name]) for name in GOAL_COMMANDS)
    verdict = "met" if worst <= GOAL_SECONDS else "not met"
    return (
        f"Each command run {repeats} times as a child process, interleaved; CPU is the child's "
        "user+system time from exec to exit (interpreter start and imports included). "
        f"`usage` and `dlq list` read a throwaway redis-server (`SUPERSIM_STREAM_NAME=bench`) "
        f"whose dead-letter store holds {DEAD_LETTERS} entries. The `import` rows load only "
        "the libraries those two commands need, nothing of the worker. The worker's modules "
        "are byte-compiled before the runs, as in the image (`deploy/Dockerfile`).\n\n"
        "| command | CPU s (median) | CPU s (min) | wall s (median) |\n|---|---:|---:|---:|\n"
        f"{rows}\n"
        f"Goal (issue 14): `--help`, `usage` and `dlq list` in at most {GOAL_SECONDS} s CPU: "
        f"{verdict} (worst median {worst:.3f} s).\n"
    )
