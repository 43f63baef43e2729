"""Decode cost per event, beside ``orjson.loads`` alone on the same bytes.

The record is the real ``data-session.updated`` sample kept beside the repository
(``../shared/reference/samples/``); if it is missing, the same event is built with
``tests/events.py``. Each figure is the best (minimum) of several ``timeit`` repeats,
interleaved so that a noisy neighbour slows both sides alike.
"""

from __future__ import annotations

import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pydantic

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import events  # noqa: E402 - tests/ is put on sys.path just above

from worker.events.decode import decode  # noqa: E402
from worker.events.records import ConnectionEnvelope, ConnectionEvent  # noqa: E402

KEY = "decode"
TITLE = "Decode: cost per event"
GOAL = 3.0
"""Target: decoding an event costs at most this many times ``orjson.loads`` of its bytes."""
SAMPLES = REPO.parent / "shared" / "reference" / "samples"
SAMPLE = "data-session-updated.json"


def sample_record() -> tuple[bytes, str]:
    """The benchmark record and where it came from."""
    path = SAMPLES / SAMPLE
    if path.is_file():
        return path.read_bytes(), f"the real sample `shared/reference/samples/{SAMPLE}`"
    event = events.make_event("data-session.updated")
    raw = orjson.dumps(event, option=orjson.OPT_INDENT_2)
    return raw, f"`tests/events.py` `make_event()` (the sample {SAMPLE} was not found)"


def best_of(cases: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """Seconds per call of each case: the minimum over ``repeat`` interleaved timeit runs.

    Each run lasts about 5 ms: many short runs find a quiet moment on a busy machine more
    surely than a few long ones.
    """
    timers = {name: timeit.Timer(fn) for name, fn in cases.items()}
    numbers = {name: max(1, timer.autorange()[0] // 40) for name, timer in timers.items()}
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat):
        for name, timer in timers.items():
            best[name] = min(best[name], timer.timeit(numbers[name]) / numbers[name])
    return best


def run(quick: bool = False) -> str:
    raw, origin = sample_record()
    event = decode(raw)
    if not isinstance(event, ConnectionEvent):  # pragma: no cover - the sample is an event
        raise SystemExit(f"benchmark record decoded to {type(event).__name__}")
    validate = ConnectionEnvelope.__pydantic_validator__.validate_python
    parsed = orjson.loads(raw)
    validate(parsed)  # the sample must validate as it is, times included
    as_string = events.make_record("data-session.updated", data_as_string=True)
    kore = events.make_record("attachment.rejected", vendor="kore")
    cases: dict[str, Callable[[], Any]] = {
        "`orjson.loads(raw)`": lambda: orjson.loads(raw),
        "`decode(raw)`": lambda: decode(raw),
        "`decode`, `data` as a JSON string": lambda: decode(as_string),
        "`decode`, KORE attachment.rejected": lambda: decode(kore),
        "pydantic validation alone (of the parsed dict)": lambda: validate(parsed),
        "`orjson.loads` + pydantic validation": lambda: validate(orjson.loads(raw)),
    }
    repeat = 5 if quick else 151
    seconds = best_of(cases, repeat)
    base = seconds["`orjson.loads(raw)`"]
    ratio = seconds["`decode(raw)`"] / base

    rows = [
        "| What | µs per event | events/s | x `orjson.loads` |",
        "|---|---:|---:|---:|",
    ]
    for name, value in seconds.items():
        rows.append(f"| {name} | {value * 1e6:.2f} | {1 / value:,.0f} | {value / base:.2f} |")
    verdict = "met" if ratio <= GOAL else "not met"
    return (
        f"Record: {origin}, {len(raw):,} bytes (rows 3 and 4: `tests/events.py` records, "
        f"compact JSON). Best of {repeat} interleaved `timeit` repeats; "
        f"pydantic {pydantic.VERSION}, orjson {orjson.__version__}. The last two rows are "
        "the `ConnectionEnvelope` validator (which parses the times too) on the already "
        "parsed sample, then with `orjson.loads` before it: that is the floor of decoding "
        "into pydantic models, before any of `decode`'s own checks.\n\n"
        + "\n".join(rows)
        + f"\n\n**decode / orjson.loads = {ratio:.2f}x** (goal ≤ {GOAL:.0f}x: {verdict}).\n"
    )


if __name__ == "__main__":
    print(run(quick="--quick" in sys.argv))
