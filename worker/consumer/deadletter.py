"""The dead-letter store: a bounded Redis stream per consumer group.

Every record the worker cannot handle ends here with its raw bytes, where it came from,
and why: a decode failure (handler ``decode``) or a handler that kept failing on it after
retries and bisection. Nothing is skipped without an entry, and nothing is ever trimmed
away: a warning is logged and counted from 80 % of ``dlq_maxlen``, and once a write would
go past it the write is refused with ``DeadLetterStoreFull``. That batch is then not
checkpointed; its shard waits, retrying with backoff, until entries are redriven or
deleted (``supersim-worker dlq``) or the capacity is raised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import structlog

from worker.errors import RetriableError
from worker.owned_task import OwnedTask

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.metrics import Metrics

WARN_FILL: Final = 0.8
DECODE: Final = "decode"


class DeadLetterStoreFull(RetriableError):
    """The store is at capacity: the batch waits rather than losing a dead letter."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    raw: bytes
    shard_id: str
    sequence_number: str
    partition_key: str
    arrival: datetime | None
    reason: str
    handler: str
    exception: str = ""
    entry_id: str = ""

    def fields(self) -> dict[str, bytes | str]:
        return {
            "raw": self.raw,
            "shard_id": self.shard_id,
            "sequence_number": self.sequence_number,
            "partition_key": self.partition_key,
            "arrival": self.arrival.isoformat() if self.arrival else "",
            "reason": self.reason,
            "handler": self.handler,
            "exception": self.exception,
            "dead_lettered_at": datetime.now(UTC).isoformat(),
        }

    @classmethod
    def from_fields(cls, entry_id: str, fields: dict[bytes, bytes]) -> DeadLetter:
        text = {k.decode(): v for k, v in fields.items()}
        arrival = text.get("arrival", b"").decode()
        return cls(
            raw=text.get("raw", b""),
            shard_id=text.get("shard_id", b"").decode(),
            sequence_number=text.get("sequence_number", b"").decode(),
            partition_key=text.get("partition_key", b"").decode(),
            arrival=datetime.fromisoformat(arrival) if arrival else None,
            reason=text.get("reason", b"").decode(),
            handler=text.get("handler", b"").decode(),
            exception=text.get("exception", b"").decode(),
            entry_id=entry_id,
        )


class DeadLetterStore:
    """The store of one stream and consumer group. ``metrics`` counts what ``add`` does;
    without it (the ``dlq`` commands, which only read and delete) nothing is counted."""

    def __init__(self, redis: Redis, key: str, maxlen: int, metrics: Metrics | None = None) -> None:
        self._redis = redis
        self.key = key
        self.maxlen = maxlen
        self._metrics = metrics
        self._log = structlog.get_logger("worker.consumer.deadletter")

    async def add(self, letters: Sequence[DeadLetter]) -> None:
        """Store the entries, or raise ``DeadLetterStoreFull`` if they do not fit.

        Two round trips (the length, then the entries): dead letters are rare, and a few
        entries over capacity when replicas write at once do no harm.
        """
        if not letters:
            return
        length = int(await self._redis.xlen(self.key))
        # An empty store takes any batch, so one batch bigger than the capacity cannot wait
        # for ever.
        if length and length + len(letters) > self.maxlen:
            if self._metrics is not None:
                self._metrics.incr("dead_letter_store_full")
            self._show_length(length)
            self._log.error(
                "dead_letter_store_full",
                length=length,
                capacity=self.maxlen,
                waiting=len(letters),
                shard_id=letters[0].shard_id,
                hint="the shard waits: redrive or delete entries with `supersim-worker dlq`, "
                "or raise SUPERSIM_DLQ_MAXLEN",
            )
            raise DeadLetterStoreFull(
                f"dead-letter store full ({length} of {self.maxlen} entries): "
                f"{len(letters)} records wait"
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            for letter in letters:
                pipe.xadd(self.key, letter.fields())  # type: ignore[arg-type]
            results = await pipe.execute()
        length += len(results)
        if self._metrics is not None:
            self._metrics.incr("dead_letters", len(letters))
        self._show_length(length)
        for letter in letters:
            self._log.warning(
                "dead_lettered",
                shard_id=letter.shard_id,
                sequence_number=letter.sequence_number,
                handler=letter.handler,
                reason=letter.reason,
                exception=letter.exception or None,
            )
        if length >= self.maxlen * WARN_FILL:
            if self._metrics is not None:
                self._metrics.incr("dead_letter_fill_warnings")
            self._log.warning(
                "dead_letter_store_filling",
                length=length,
                capacity=self.maxlen,
                hint="when full, shards wait instead of dead-lettering: inspect with "
                "`supersim-worker dlq list`",
            )

    async def list(
        self, count: int = 100, start: str = "-", *, newest: bool = False
    ) -> list[DeadLetter]:
        """Up to ``count`` entries from ``start`` on (an id, ``(id`` for after it), oldest
        first; or with ``newest`` the newest ``count``, newest first."""
        if newest:
            entries = await self._redis.xrevrange(self.key, max="+", min="-", count=count)
        else:
            entries = await self._redis.xrange(self.key, min=start, max="+", count=count)
        return [DeadLetter.from_fields(_text(entry_id), fields) for entry_id, fields in entries]

    async def delete(self, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return 0
        return int(await self._redis.xdel(self.key, *entry_ids))

    async def length(self) -> int:
        return int(await self._redis.xlen(self.key))

    async def read_length(self) -> int:
        """The store's length, read now and shown in the metrics."""
        length = await self.length()
        self._show_length(length)
        return length

    def _show_length(self, length: int) -> None:
        if self._metrics is not None:
            self._metrics.gauge("dead_letter_length", length)
            self._metrics.dead_letter_length.set(length)


class LengthGauge(OwnedTask):
    """Keeps ``supersim_dead_letter_length`` current while the worker runs: the store's
    length read at start-up and every ``every`` seconds, so the gauge shows entries earlier
    runs left and follows redrives and deletions (``supersim-worker dlq``) and other
    replicas' writes, not only this process's own writes. A failed read (Redis
    unreachable: the consumer reports that itself) keeps the last value until one passes."""

    name = "dead-letter-gauge"

    def __init__(self, store: DeadLetterStore, every: float) -> None:
        super().__init__()
        self._store = store
        self._every = every
        self._log = structlog.get_logger("worker.consumer.deadletter")

    async def _run(self) -> None:
        while True:
            try:
                await self._store.read_length()
            except Exception as exc:
                self._log.debug("dead_letter_length_unread", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self._every)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
