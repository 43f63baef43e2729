"""``supersim-worker replay FILE.jsonl``: replay recorded events through the worker locally.

Starts moto_server on a free loopback port (or uses ``--endpoint-url``: kinesalite or a
real stream), creates a stream, puts the file's records (partition key = SIM sid;
PutRecords calls one at a time, never overlapping), runs the worker from TRIM_HORIZON
until it has caught up, prints a summary and stops what it started. Redis is
``SUPERSIM_REDIS_URL`` or ``REDIS_URL`` when set, else a throwaway redis-server.

The local servers come from ``worker.devtools``, imported only when replay starts one, so
no other command loads development tools. moto_server is the ``local`` install extra.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from worker import logs
from worker.cli.commands import COMMANDS
from worker.cli.decode import iter_records
from worker.cli.runner import LAST_TICK_INCOMPLETE, run_until_done
from worker.consumer import kinesis
from worker.consumer.app import run_worker, tune_gc
from worker.errors import ConfigError
from worker.settings import Settings, load_settings

MAX_PUT_RECORDS: Final = 500
MAX_PUT_BYTES: Final = 5 * 1024 * 1024
PUT_ATTEMPTS: Final = 10


def partition_key(raw: bytes) -> str:
    """The SIM sid when the record has one, else a stable hash of the bytes."""
    try:
        obj = orjson.loads(raw)
        data = obj.get("data") if isinstance(obj, dict) else None
        if isinstance(data, str):
            data = orjson.loads(data)
        if isinstance(data, dict) and isinstance(data.get("sim_sid"), str) and data["sim_sid"]:
            return str(data["sim_sid"])[:256]
    except orjson.JSONDecodeError:
        pass
    return hashlib.sha256(raw).hexdigest()[:32]


def chunks(records: Sequence[bytes]) -> Iterator[list[bytes]]:
    """PutRecords-sized chunks: at most 500 records and 5 MiB each."""
    chunk: list[bytes] = []
    size = 0
    for raw in records:
        if chunk and (len(chunk) == MAX_PUT_RECORDS or size + len(raw) > MAX_PUT_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(raw)
        size += len(raw) + 256
    if chunk:
        yield chunk


async def put_all(client: Any, stream: str, records: Sequence[bytes]) -> int:
    """Put every record, retrying the failed ones; calls never overlap (moto loses records)."""
    for chunk in chunks(records):
        pending = [{"Data": raw, "PartitionKey": partition_key(raw)} for raw in chunk]
        for attempt in range(1, PUT_ATTEMPTS + 1):
            response = await client.put_records(StreamName=stream, Records=pending)
            if not response.get("FailedRecordCount"):
                break
            pending = [
                entry
                for entry, result in zip(pending, response["Records"], strict=True)
                if result.get("ErrorCode")
            ]
            await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        else:
            raise ConfigError(f"PutRecords kept failing for {len(pending)} records")
    return len(records)


async def create_stream(client: Any, stream: str, shards: int) -> None:
    await client.create_stream(StreamName=stream, ShardCount=shards)
    waiter = client.get_waiter("stream_exists")
    await waiter.wait(StreamName=stream, WaiterConfig={"Delay": 0.2, "MaxAttempts": 300})


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    records: int
    kinds: dict[str, int]
    skipped: int
    dead_lettered: int
    seconds: float
    caught_up: bool
    last_tick_incomplete: dict[str, str]
    """By handler: what its last tick and flush left undone (see ``RunSummary``)."""


async def replay(settings: Settings, records: Sequence[bytes], shards: int) -> ReplaySummary:
    started = time.monotonic()
    async with kinesis.client(settings) as client:
        await create_stream(client, settings.stream_name, shards)
        await put_all(client, settings.stream_name, records)
    summary = await run_worker(settings, from_start=True, until_caught_up=True)
    metrics = summary.metrics
    kinds = {k.removeprefix("kind:"): int(v) for k, v in metrics.items() if k.startswith("kind:")}
    return ReplaySummary(
        records=len(records),
        kinds=dict(sorted(kinds.items())),
        skipped=int(sum(v for k, v in metrics.items() if k.startswith("skipped_"))),
        dead_lettered=int(metrics.get("dead_letters", 0)),
        seconds=time.monotonic() - started,
        caught_up=summary.caught_up,
        last_tick_incomplete=summary.last_tick_incomplete,
    )


def _start_moto(stack: ExitStack) -> str:
    """Start a throwaway moto_server, stopped when ``stack`` closes; its URL."""
    from worker.devtools import local_servers  # development tools: loaded only when needed

    moto = local_servers.start_moto()
    stack.callback(moto.stop)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "replay")  # moto accepts any credentials
    return moto.url


def _start_redis(stack: ExitStack) -> str:
    """Start a throwaway redis-server, stopped when ``stack`` closes; its URL."""
    from worker.devtools import local_servers  # development tools: loaded only when needed

    server = local_servers.start_redis()
    stack.callback(server.stop)
    return server.url


def run(args: argparse.Namespace) -> int:
    payload = args.file.read_bytes()
    records = [raw for _, raw in iter_records(payload)]
    with ExitStack() as stack:
        endpoint: str = args.endpoint_url or _start_moto(stack)
        redis_url = (
            os.environ.get("SUPERSIM_REDIS_URL")
            or os.environ.get("REDIS_URL")
            or _start_redis(stack)
        )
        settings = load_settings(
            stream_name=args.stream or f"replay-{uuid.uuid4().hex[:8]}",
            endpoint_url=endpoint,
            redis_url=redis_url,
            consumer_group=args.consumer_group,
            idle_interval=0.2,
            discovery_interval=1.0,
            **({"handlers": tuple(args.handlers.split(","))} if args.handlers else {}),
        )
        logs.configure(settings.log_format.value, settings.log_level.value, settings.redact_pii)
        structlog.get_logger("worker.cli.replay").info(
            "replay_starting", records=len(records), endpoint=endpoint, shards=args.shards
        )
        tune_gc()
        summary = run_until_done(replay(settings, records, args.shards))
    print(f"replayed {summary.records} records in {summary.seconds:.2f} s")
    for kind, count in summary.kinds.items():
        print(f"  {kind:<24} {count}")
    print(f"  {'skipped':<24} {summary.skipped}")
    print(f"  {'dead-lettered':<24} {summary.dead_lettered}")
    print(f"stream {settings.stream_name}, consumer group {settings.consumer_group}")
    if not summary.caught_up:
        return 1
    if summary.last_tick_incomplete:
        for name, left in summary.last_tick_incomplete.items():
            print(f"  left by {name}: {left}")
        return LAST_TICK_INCOMPLETE
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "replay",
        help=COMMANDS["replay"].help,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", type=Path, help="JSON Lines file, one record per line")
    parser.add_argument("--shards", type=int, default=4, help="shards of the stream (default 4)")
    parser.add_argument("--endpoint-url", help="Kinesis endpoint to use instead of moto_server")
    parser.add_argument("--stream", help="stream name to create (default replay-<random>)")
    parser.add_argument(
        "--consumer-group", default="replay", help="consumer group (default replay)"
    )
    parser.add_argument("--handlers", help="comma-separated handlers (default: SUPERSIM_HANDLERS)")
    parser.set_defaults(func=run)
