"""Replicas of one consumer group as real ``supersim-worker run`` processes, for the
scale-out tests (``test_scale_out.py``) and their benchmark (``bench/scale_bench.py``).

A ``Group`` is one stream and consumer group on a kinesalite and a redis-server: it creates
the stream, starts replicas (``python -m worker run`` with the ``recording`` handler, JSON
logs in a file per replica), reads who holds which lease (straight from Redis: cheap enough
to poll every few hundred milliseconds), and runs the real ``status --format json``. A
``Trickle`` puts one record on every open shard per period and notes when each one is
handled, so a test can say how long a shard went unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from events import make_record
from kinesis_support import create_stream, kinesis_client
from recording import seen_key
from redis.asyncio import Redis

from worker import keys
from worker.consumer.leases import LeaseManager, LeaseState

TESTS = Path(__file__).resolve().parent
GROUP = "supersim-worker"


@dataclass
class Replica:
    """One ``supersim-worker run`` process. Its replica id (``host:pid:random``) holds its
    pid, which is how leases and heartbeats are traced back to it."""

    process: subprocess.Popen[bytes]
    log: Path
    name: str
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.process.pid

    def owns(self, owner: str | None) -> bool:
        """Whether ``owner`` (a lease owner or a replica id) is this process."""
        return bool(owner) and owner.rsplit(":", 2)[-2] == str(self.pid)  # type: ignore[union-attr]

    def running(self) -> bool:
        return self.process.poll() is None

    def stopped(self) -> bool:
        """Whether it is stopped (SIGSTOP): state ``T`` in ``/proc/<pid>/stat``."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def wait(self, within: float) -> int:
        """Its exit status, once it exits (``subprocess.TimeoutExpired`` after ``within`` s)."""
        return await asyncio.to_thread(self.process.wait, within)

    def events(self, *names: str) -> list[dict[str, Any]]:
        """Its JSON log lines (those whose ``event`` is one of ``names``, if given)."""
        out = []
        for line in self.log.read_bytes().splitlines():
            if line.startswith(b"{"):
                entry = orjson.loads(line)
                if not names or entry.get("event") in names:
                    out.append(entry)
        return out

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@dataclass
class Group:
    """One stream and consumer group with its replicas (see the module docstring)."""

    kinesalite: str
    redis_url: str
    logs: Path
    env: dict[str, str] = field(default_factory=dict)
    stream: str = field(default_factory=lambda: f"s-{uuid.uuid4().hex[:8]}")
    replicas: list[Replica] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    """The stream's shard ids, as last listed (``list_shards``)."""
    open_shards: dict[str, str] = field(default_factory=dict)
    """Open shard id → a hash key in its range, as last listed."""

    def __post_init__(self) -> None:
        self.redis = Redis.from_url(self.redis_url)
        self._leases = LeaseManager(self.redis, self.key_prefix, owner="", ttl_seconds=8)

    @property
    def key_prefix(self) -> str:
        return keys.prefix(self.stream, GROUP)

    def worker_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
        env.update(
            PYTHONPATH=str(TESTS),
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            SUPERSIM_STREAM_NAME=self.stream,
            SUPERSIM_ENDPOINT_URL=self.kinesalite,
            SUPERSIM_REDIS_URL=self.redis_url,
            SUPERSIM_HANDLERS="recording:create",
            SUPERSIM_INITIAL_POSITION="TRIM_HORIZON",
            SUPERSIM_IDLE_INTERVAL="0.25",
            SUPERSIM_LOG_FORMAT="json",
        )
        env.update(self.env)
        return env

    async def create(self, shards: int) -> None:
        await create_stream(self.kinesalite, self.stream, shards=shards)
        await self.list_shards()

    async def list_shards(self) -> None:
        async with kinesis_client(self.kinesalite) as client:
            listed = (await client.list_shards(StreamName=self.stream))["Shards"]
        self.shards = [s["ShardId"] for s in listed]
        self.open_shards = {
            s["ShardId"]: s["HashKeyRange"]["StartingHashKey"]
            for s in listed
            if "EndingSequenceNumber" not in s["SequenceNumberRange"]
        }

    def start(self, **env: str) -> Replica:
        """Start a replica, with ``env`` on top of the group's environment."""
        self.logs.mkdir(parents=True, exist_ok=True)
        name = f"{self.stream}-r{len(self.replicas)}"
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", "run"],
                env={**self.worker_env(), **env},
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        replica = Replica(process, log, name)
        self.replicas.append(replica)
        return replica

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.running()]

    def replica(self, owner: str | None) -> Replica | None:
        return next((r for r in self.replicas if r.owns(owner)), None)

    async def close(self) -> None:
        """Kill every replica still running (SIGCONT first: a stopped one would not die)."""
        for replica in self.live():
            with contextlib.suppress(ProcessLookupError):
                replica.signal(signal.SIGCONT)
                replica.signal(signal.SIGKILL)
        for replica in self.replicas:
            await replica.wait(30)
        await self.redis.aclose()

    def logs_tail(self) -> str:
        return "\n".join(f"--- {r.name}\n{r.tail(1500)}" for r in self.replicas)

    # --- leases, read from Redis -----------------------------------------------------------

    async def leases(self) -> dict[str, LeaseState]:
        """Every listed shard's lease (owner, token, expiry, steal request)."""
        return await self._leases.snapshot(self.shards)

    async def live_ids(self) -> list[str]:
        """The replica ids in the group's live set."""
        return list((await self._leases.heartbeat(alive=False)).expiry_ms)

    async def counts(self) -> dict[str, int]:
        """Open shards' leases per running replica (by name; 0 for one holding none)."""
        leases = await self.leases()
        return counts(self.live(), (leases[sid].owner for sid in self.open_shards))

    async def wait_for(
        self, check: Callable[[], Any], within: float, what: str, interval: float = 0.2
    ) -> float:
        """Poll the async ``check`` until it is true; fail after ``within`` seconds naming
        ``what`` (with the leases held then). Returns the seconds it took."""
        began = time.monotonic()
        while not await check():
            if time.monotonic() - began > within:
                raise AssertionError(
                    f"{self.stream}: {what} not within {within} s; leases {await self.counts()}"
                    f"\n{self.logs_tail()}"
                )
            await asyncio.sleep(interval)
        return time.monotonic() - began

    async def wait_balanced(
        self, expected: Iterable[int], within: float, interval: float = 0.2
    ) -> float:
        """Wait until every open shard is held by a running replica and they hold
        ``expected`` leases (in any order); returns the seconds it took."""
        want = sorted(expected)

        async def balanced() -> bool:
            leases = await self.leases()
            owners = [leases[sid].owner for sid in self.open_shards]
            held = all(self.replica(owner) in self.live() for owner in owners)
            return held and sorted(counts(self.live(), owners).values()) == want

        return await self.wait_for(balanced, within, f"leases {want}", interval)

    async def held_by(self, replica: Replica) -> list[str]:
        leases = await self.leases()
        return [sid for sid in self.shards if replica.owns(leases[sid].owner)]

    # --- the status command ---------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The output of the real ``supersim-worker status --format json``."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "status",
            "--format",
            "json",
            env=self.worker_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, stderr.decode()[-2000:]
        status: dict[str, Any] = orjson.loads(stdout)
        return status

    # --- records --------------------------------------------------------------------------

    async def handled(self, start: int = 0) -> list[tuple[str, str, str]]:
        """(shard, sequence number, event sid) of every handled event from index ``start``,
        in handling order (across all replicas)."""
        raw = await self.redis.lrange(seen_key(self.key_prefix), start, -1)  # type: ignore[misc]
        return [tuple(item.decode().split("|")) for item in raw]  # type: ignore[misc]

    async def checkpoints(self) -> dict[str, str]:
        raw = await self.redis.hgetall(keys.checkpoints(self.key_prefix))  # type: ignore[misc]
        return {k.decode(): v.decode() for k, v in raw.items()}


def counts(replicas: Iterable[Replica], owners: Iterable[str | None]) -> dict[str, int]:
    """Leases per replica (by name) among ``owners``; every replica listed, 0 if none."""
    replicas = list(replicas)
    held = Counter(replica.name for owner in owners for replica in replicas if replica.owns(owner))
    return {replica.name: held.get(replica.name, 0) for replica in replicas}


def event_sid(record: bytes) -> str:
    return str(orjson.loads(record)["id"])


def sids(records: Iterable[bytes]) -> set[str]:
    return {event_sid(record) for record in records}


@dataclass
class Trickle:
    """While running (``async with``): puts one record on each open shard of ``group``
    every ``period`` and notes when each record was put and first seen handled (monotonic
    seconds)."""

    group: Group
    period: float = 0.25
    put_at: dict[str, tuple[str, float]] = field(default_factory=dict)
    """Event sid → (the shard it was put on, when)."""
    seen_at: dict[str, float] = field(default_factory=dict)
    """Event sid → when it was first seen handled."""
    first_seq: int = 1_000_000
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Trickle:
        self._seq = self.first_seq
        self._seen = 0
        self._tasks = [
            asyncio.create_task(self._produce(), name=f"trickle-put-{self.group.stream}"),
            asyncio.create_task(self._watch(), name=f"trickle-watch-{self.group.stream}"),
        ]
        return self

    async def __aexit__(self, *_: object) -> None:
        for task in self._tasks:
            task.cancel()
        for result in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(result, Exception):
                raise result

    async def _produce(self) -> None:
        async with kinesis_client(self.group.kinesalite) as client:
            while True:
                batch = []
                for shard, hash_key in self.group.open_shards.items():
                    self._seq += 1
                    record = make_record("attachment.accepted", seq=self._seq)
                    batch.append((shard, event_sid(record), record, hash_key))
                response = await client.put_records(
                    StreamName=self.group.stream,
                    Records=[
                        {"Data": record, "PartitionKey": "k", "ExplicitHashKey": hash_key}
                        for _, _, record, hash_key in batch
                    ],
                )
                assert not response.get("FailedRecordCount"), response
                now = time.monotonic()
                for shard, sid, _, _ in batch:
                    self.put_at[sid] = (shard, now)
                await asyncio.sleep(self.period)

    async def _watch(self) -> None:
        while True:
            new = await self.group.handled(self._seen)
            self._seen += len(new)
            now = time.monotonic()
            for _, _, sid in new:
                self.seen_at.setdefault(sid, now)
            await asyncio.sleep(0.05)

    def resumed(self, shards: Iterable[str], after: float) -> dict[str, float]:
        """Per shard of ``shards``: seconds from ``after`` until the first record put on it
        after that time was handled (a shard not read again yet is left out)."""
        wanted = set(shards)
        out: dict[str, float] = {}
        for sid, (shard, put) in list(self.put_at.items()):
            if shard in wanted and put >= after and sid in self.seen_at:
                out[shard] = min(out.get(shard, float("inf")), self.seen_at[sid] - after)
        return out

    async def wait_resumed(self, shards: Iterable[str], after: float, within: float) -> float:
        """Wait until every shard of ``shards`` has had a record put after ``after``
        handled; returns the longest of those delays (seconds from ``after``)."""
        wanted = set(shards)
        while True:
            resumed = self.resumed(wanted, after)
            if len(resumed) == len(wanted):
                return max(resumed.values(), default=0.0)
            if time.monotonic() - after > within:
                raise AssertionError(
                    f"{self.group.stream}: shards {sorted(wanted - set(resumed))} not read "
                    f"again within {within} s\n{self.group.logs_tail()}"
                )
            await asyncio.sleep(0.05)

    def latencies(self, after: float, until: float) -> list[tuple[str, float]]:
        """(shard, seconds from put to handled; to ``until`` if not handled yet) of each
        record put between ``after`` and ``until``, the longest first."""
        out = [
            (shard, self.seen_at.get(sid, until) - put)
            for sid, (shard, put) in list(self.put_at.items())
            if after <= put <= until
        ]
        return sorted(out, key=lambda item: -item[1])

    async def wait_all_handled(self, within: float) -> set[str]:
        """Wait until every record put so far has been handled; returns their sids."""
        expected = set(self.put_at)
        began = time.monotonic()
        while missing := [sid for sid in expected if sid not in self.seen_at]:
            if time.monotonic() - began > within:
                shards = sorted({self.put_at[sid][0] for sid in missing})
                raise AssertionError(
                    f"{self.group.stream}: {len(missing)} of {len(expected)} trickled "
                    f"records not handled within {within} s (shards {shards})"
                    f"\n{self.group.logs_tail()}"
                )
            await asyncio.sleep(0.1)
        return expected


def duplicates(handled: Iterable[tuple[str, str, str]]) -> dict[str, int]:
    """Event sids handled more than once, with how many times."""
    seen = Counter(sid for _, _, sid in handled)
    return {sid: n for sid, n in seen.items() if n > 1}


def check_status_shape(status: Mapping[str, Any]) -> None:
    """The fields scripts may rely on (issue #12): ``shards`` with shard_id, owner, token,
    checkpoint, millis_behind; ``replicas`` with id, leases, heartbeat_age_s."""
    for row in status["shards"]:
        assert {"shard_id", "owner", "token", "checkpoint", "millis_behind"} <= set(row), row
    for replica in status["replicas"]:
        assert {"id", "leases", "heartbeat_age_s"} <= set(replica), replica
        assert isinstance(replica["leases"], int)
        assert isinstance(replica["heartbeat_age_s"], int | float)
        assert replica["heartbeat_expires_in_s"] > 0, "a live replica's heartbeat"
