"""``supersim-worker decode FILE``: decode records from a file and report each one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import orjson

from worker.cli.commands import COMMANDS
from worker.errors import ConfigError, DecodeError
from worker.events.decode import decode
from worker.events.records import ConnectionEvent, SinkTestEvent


def iter_records(payload: bytes) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, record bytes): one record for a single JSON document spread over
    several lines, else one per non-blank line (JSON Lines)."""
    stripped = payload.strip()
    if b"\n" in stripped and _one_document(stripped):
        yield 1, stripped
        return
    for number, line in enumerate(payload.splitlines(), start=1):
        if line.strip():
            yield number, line


def _one_document(stripped: bytes) -> bool:
    """True for a multi-line JSON object, and for anything pretty-printed: its first line
    holds only ``{`` or ``[``, which no JSON Lines record does. A broken pretty document (a
    truncated file, bad bytes, a JSON array) is then reported once, not line by line."""
    if stripped.split(b"\n", 1)[0].strip() in (b"{", b"["):
        return True
    if not stripped.startswith(b"{"):
        return False
    try:
        whole = orjson.loads(stripped)
    except orjson.JSONDecodeError:
        return False
    return isinstance(whole, dict)


def describe(raw: bytes) -> tuple[bool, str]:
    """One line about one record: its kind, or why it failed to decode."""
    try:
        event = decode(raw)
    except DecodeError as exc:
        return False, f"error: {exc.reason}"
    if isinstance(event, ConnectionEvent):
        return True, (
            f"{event.kind.value} ({event.vendor.value}, schema v{event.schema_version}) "
            f"{event.event_sid}"
        )
    if isinstance(event, SinkTestEvent):
        return True, f"sink test event ({event.vendor.value})"
    return True, f"skipped: not a connection event (type {event.type})"


def run_decode(path: Path, out: TextIO) -> int:
    try:
        payload = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    failed = total = 0
    for number, raw in iter_records(payload):
        total += 1
        ok, line = describe(raw)
        failed += not ok
        out.write(f"{path}:{number}: {line}\n")
    out.write(f"{total} records, {total - failed} decoded, {failed} failed\n")
    return 1 if failed else 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "decode",
        help=COMMANDS["decode"].help,
        description="Print each record's kind or its decode error; exit 1 if any failed.",
    )
    parser.add_argument(
        "file", type=Path, help="JSON Lines file, one JSON document, or - for stdin"
    )
    parser.set_defaults(func=lambda args: run_decode(args.file, sys.stdout))
