"""Our worker with its event loop watched: ``supersim-worker`` run in this process, timing
every callback the event loop runs (for a task, one step from an ``await`` to the next).

    python loop_probe.py STALLS.json run --from-start --until-caught-up

Nothing else runs while a callback does, so the longest callbacks are the longest waits a
lease renewal can meet at each of its turns. At exit it writes::

    {"full_collections": n, "longest_full_collection": s, "callbacks": N,
     "over": {"0.05": n, ...}, "longest": [[seconds, "what"], ...]}

``over`` counts callbacks longer than each bound (seconds); ``longest`` names the 20 longest
by task name and coroutine (or the callback); ``full_collections`` and
``longest_full_collection`` count and time the garbage collector's full (generation 2)
collections, which run inside whichever callback triggers them. Two clock reads per
callback, a few microseconds per 10,000-record batch.
"""

from __future__ import annotations

import asyncio.events
import gc
import heapq
import sys
import time
from pathlib import Path
from typing import Any, Final

import orjson

from worker.cli.main import main

BOUNDS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
KEPT: Final = 20

callbacks = 0
over = dict.fromkeys(BOUNDS, 0)
longest: list[tuple[float, int, str]] = []
"""A min-heap of the longest callbacks: (seconds, order, what ran)."""
_run = asyncio.events.Handle._run


def _what(callback: Any) -> str:
    """The task's name and coroutine, and where the step ended: the innermost await the
    task was suspended at right after it (the stretch ran up to that line)."""
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return f"{owner.get_name()} {getattr(coro, '__qualname__', coro)}{_suspended_at(coro)}"
    return getattr(callback, "__qualname__", repr(callback))


def _suspended_at(coro: Any) -> str:
    where = ""
    while coro is not None and getattr(coro, "cr_frame", None) is not None:
        frame = coro.cr_frame
        where = f" → {frame.f_code.co_name}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None)
    return where


def _timed_run(self: asyncio.events.Handle) -> None:
    global callbacks
    began = time.perf_counter()
    _run(self)
    took = time.perf_counter() - began
    callbacks += 1
    if took < BOUNDS[0]:
        return
    for bound in BOUNDS:
        if took >= bound:
            over[bound] += 1
    entry = (took, callbacks, _what(self._callback))
    if len(longest) < KEPT:
        heapq.heappush(longest, entry)
    elif took > longest[0][0]:
        heapq.heapreplace(longest, entry)


gc_pauses: list[float] = []
_gc_began = 0.0


def _gc_timed(phase: str, info: dict[str, int]) -> None:
    global _gc_began
    if phase == "start":
        _gc_began = time.perf_counter()
    elif info["generation"] == 2:
        gc_pauses.append(time.perf_counter() - _gc_began)


if __name__ == "__main__":
    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    gc.callbacks.append(_gc_timed)
    status = main(sys.argv[2:])
    report = {
        "full_collections": len(gc_pauses),
        "longest_full_collection": round(max(gc_pauses, default=0.0), 4),
        "callbacks": callbacks,
        "over": {str(bound): count for bound, count in over.items()},
        "longest": [[round(took, 4), what] for took, _, what in sorted(longest, reverse=True)],
    }
    Path(sys.argv[1]).write_bytes(orjson.dumps(report))
    raise SystemExit(status)
