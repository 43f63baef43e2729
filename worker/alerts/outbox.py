"""The alert outbox in Redis: sent transitions waiting for (or retrying) delivery.

``episodes.lua`` writes one entry per sink for every transition it sends, atomically with
the state change, and claims due entries with a lease. After a delivery round the
dispatcher settles them here with ``outbox.lua``: delivered entries are removed (the
Redis stream sink's entry is appended to the stream in that same step), failed ones are
due again later, hopeless ones move to ``<prefix>:dead`` with their reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from redis.asyncio import Redis

SCRIPT: Final = resources.files("worker.alerts").joinpath("outbox.lua").read_text("utf-8")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class ClaimedEntry:
    """An outbox entry claimed for one delivery round."""

    entry: str
    """``sink|kind|subject|episode key|status``: one per sink and transition."""
    payload: str
    tries: int
    """Earlier failed rounds."""

    @property
    def sink(self) -> str:
        return self.entry.partition("|")[0]

    @classmethod
    def from_reply(cls, flat: Sequence[bytes | str]) -> list[ClaimedEntry]:
        return [
            cls(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]


class Outcome(StrEnum):
    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one claimed entry's delivery round ended."""

    entry: str
    outcome: Outcome
    stream_fields: tuple[str, ...] = ()
    """For the stream sink: the entry to append, written only if the entry is still there."""
    due_ms: int = 0
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "e": self.entry,
            "o": self.outcome.value,
            "x": list(self.stream_fields),
            "due": self.due_ms,
            "r": self.reason,
        }


class Outbox:
    """Settles delivery rounds and reports what is pending or dead."""

    def __init__(self, redis: Redis, prefix: str, stream_key: str, stream_maxlen: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._stream_key = stream_key
        self._maxlen = stream_maxlen
        self._script = redis.register_script(SCRIPT)

    @property
    def stream_key(self) -> str:
        return self._stream_key

    async def settle(self, results: Sequence[Settlement], now_ms: int) -> tuple[int, int, int]:
        """Apply a round's results in one round trip; returns (done, retried, dead)."""
        if not results:
            return 0, 0, 0
        request = {"now": now_ms, "maxlen": self._maxlen, "results": [r.as_json() for r in results]}
        done, retried, dead = await self._script(
            keys=[self._prefix, self._stream_key], args=[orjson.dumps(request)]
        )
        return int(done), int(retried), int(dead)

    async def pending(self) -> int:
        """Entries not yet delivered (new, claimed or waiting for a retry)."""
        count: int = await self._redis.hlen(f"{self._prefix}:outbox")  # type: ignore[misc]
        return count

    async def dead(self) -> dict[str, dict[str, Any]]:
        """Entries that were given up on: entry -> {payload, reason, at}."""
        raw = await self._redis.hgetall(f"{self._prefix}:dead")  # type: ignore[misc]
        return {_text(entry): orjson.loads(value) for entry, value in raw.items()}
