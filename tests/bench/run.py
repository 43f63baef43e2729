"""Run the benchmarks (``make bench``) and record their figures in ``BENCHMARKS.md``.

Each benchmark is a module ``<name>_bench.py`` in this directory (found by that name), with:

- ``KEY``: a short id, used to find its section in ``BENCHMARKS.md`` again;
- ``TITLE``: the section heading;
- ``run(quick: bool) -> str``: runs it and returns the section's markdown body.

This script prints every body and writes each one into ``BENCHMARKS.md`` between
``<!-- bench:KEY -->`` markers, headed by the command, date, Python and machine it was run
on. A re-run replaces its section in place; other sections and text outside the markers are
kept, so benchmarks can be run one at a time (``run.py decode``). ``--quick`` asks each
module for a short smoke run; ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent.parent
for _path in (REPO, REPO / "tests", BENCH_DIR):  # worker, tests/events.py, the benchmarks
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

FIRST = ("decode_bench",)
BENCHMARKS: tuple[str, ...] = tuple(
    sorted(
        (path.stem for path in BENCH_DIR.glob("*_bench.py")),
        key=lambda name: (name not in FIRST, FIRST.index(name) if name in FIRST else 0, name),
    )
)
"""Every ``*_bench.py`` module here: those in ``FIRST``, then the rest by name. This is the
order in which their sections are first added to BENCHMARKS.md."""

COMMAND = "make bench"
OUTPUT = REPO / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    f"Written by `{COMMAND}` (`tests/bench/run.py`): one section per benchmark, replaced in "
    "place when it is re-run. Figures are best-of-N timings on the machine named in each "
    "section; compare ratios rather than absolute times across machines.\n"
)


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    body: str


def machine() -> str:
    """OS, architecture, core count and (on Linux) the CPU model."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    model = model or platform.processor() or "unknown CPU"
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {model}"


def environment() -> str:
    """The markdown lines saying how, when and where the figures were taken."""
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return f"- Command: `{COMMAND}`\n- Date: {now}\n- Python: {python}\n- Machine: {machine()}\n"


def render(section: Section) -> str:
    return (
        f"<!-- bench:{section.key} -->\n"
        f"## {section.title}\n\n"
        f"{environment()}\n"
        f"{section.body.rstrip()}\n"
        f"<!-- /bench:{section.key} -->\n"
    )


def update(document: str, sections: Sequence[Section]) -> str:
    """``document`` with each section replaced in place, or appended if it is new."""
    text = document or HEADER
    for section in sections:
        block = render(section)
        pattern = re.compile(
            rf"<!-- bench:{re.escape(section.key)} -->\n.*?<!-- /bench:{re.escape(section.key)} -->\n?",
            re.DOTALL,
        )
        if pattern.search(text):
            text = pattern.sub(lambda _, block=block: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block
    return text


def load(name: str) -> ModuleType:
    module = importlib.import_module(name if name.endswith("_bench") else f"{name}_bench")
    for attribute in ("KEY", "TITLE", "run"):
        if not hasattr(module, attribute):
            raise SystemExit(f"benchmark module {module.__name__} has no {attribute}")
    return module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: {BENCHMARKS})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats: a smoke test")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="markdown file to update")
    args = parser.parse_args(argv)

    sections = []
    for name in args.names or BENCHMARKS:
        module = load(name)
        print(f"## {module.TITLE}\n", flush=True)
        body: str = module.run(quick=args.quick)
        print(body, flush=True)
        sections.append(Section(module.KEY, module.TITLE, body))
    if not args.no_write:
        existing = args.output.read_text() if args.output.exists() else ""
        args.output.write_text(update(existing, sections))
        print(f"updated {args.output.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
