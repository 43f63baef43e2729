"""Our worker for ``peer_bench``: ``supersim-worker`` run in this process, with marks.

    python worker_probe.py MARKS.json run --from-start --until-caught-up

runs the command line exactly as ``supersim-worker`` does, with the ``log`` handler's
``handle`` wrapped to note the process CPU time and the wall clock when the first batch
reaches it and after each batch (two clock reads per batch of up to 10,000 records). At
exit it writes the marks to ``MARKS.json``::

    {"first": [cpu, wall], "last": [cpu, wall], "records": N, "exit": [cpu, wall],
     "gc": [collections, cpu], "max_rss_kib": N}

``first`` is when the first record reached the handler (start-up plus the first read and
decode), ``last`` when the last batch had been handled, ``exit`` after the worker stopped
(checkpoints written, leases released), ``gc`` the garbage collections after the first
record reached the handler and the process CPU they took (``gc.callbacks``), ``max_rss_kib``
the process's peak resident set size (``ru_maxrss``). The handler itself is unchanged.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from worker.cli.main import main
from worker.handlers.base import Batch
from worker.handlers.log import LogHandler

marks: dict[str, Any] = {"records": 0, "gc": [0, 0.0]}
_gc_started = 0.0


def _gc_timer(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if "first" not in marks:
        return
    if phase == "start":
        _gc_started = time.process_time()
    else:
        marks["gc"][0] += 1
        marks["gc"][1] += time.process_time() - _gc_started


def _now() -> list[float]:
    return [time.process_time(), time.perf_counter()]


_handle = LogHandler.handle


async def _marked_handle(self: LogHandler, batch: Batch) -> None:
    if "first" not in marks:
        marks["first"] = _now()
    await _handle(self, batch)
    marks["records"] += len(batch)
    marks["last"] = _now()


if __name__ == "__main__":
    LogHandler.handle = _marked_handle  # type: ignore[method-assign]
    gc.callbacks.append(_gc_timer)
    status = main(sys.argv[2:])
    marks["exit"] = _now()
    marks["max_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(sys.argv[1]).write_bytes(orjson.dumps(marks))
    raise SystemExit(status)
