"""The alert outbox in Redis: sent transitions waiting for (or retrying) delivery.

``episodes.lua`` writes one entry per sink for every transition it sends, atomically with
the state change, and claims due entries with a lease. After a delivery round the
dispatcher settles them here with ``outbox.lua``: delivered entries are removed (the
Redis stream sink's entry is appended to the stream in that same step), failed ones are
due again later, hopeless ones move to ``<prefix>:dead`` with their reason. That store
has a cap: when it is full, hopeless entries stay in the outbox and are tried again
later instead (nothing is dropped to make room). A resolution that was not tried because
its opening was still pending (claimed by another replica, or failing) waits in
``<prefix>:wait``: due again just after its opening, and at once when the opening is
delivered, not when another replica's claim on it runs out; when its opening is given up,
so is the resolution (no sink gets a resolution without its opening). Settlements are
fenced: each carries the expiry its claim set as the entry's due score, and one whose
claim ran out and was taken by another replica is ignored (stale). ``requeue`` sends dead
entries back to the outbox for the next round (``supersim-worker alerts redrive``), an
opening's resolution with it; ``delete_dead`` is the one way an alert leaves without
being delivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

if TYPE_CHECKING:
    from redis.asyncio import Redis

_LUA: Final = resources.files("worker.handlers.alerts")
SCRIPT: Final = _LUA.joinpath("outbox.lua").read_text("utf-8")
CLAIM: Final = (
    _LUA.joinpath("claim.lua").read_text("utf-8")
    + "\nlocal req = cjson.decode(ARGV[1])\nreturn claim_due(KEYS[1], req.now, req.limit, req.lease)\n"
)
"""Claim due entries outside a batch (the dispatcher's next round)."""
REQUEUE: Final = """
local P = KEYS[1]
local function back(entry)
  local letter = redis.call('HGET', P .. ':dead', entry)
  if not letter then return 0 end
  redis.call('HSETNX', P .. ':outbox', entry, cjson.decode(letter).payload)
  redis.call('ZADD', P .. ':due', 0, entry)
  redis.call('HDEL', P .. ':tries', entry)
  redis.call('HSET', P .. ':requeued', entry, ARGV[1])
  redis.call('HDEL', P .. ':dead', entry)
  return 1
end
local moved = 0
for i = 2, #ARGV do moved = moved + back(ARGV[i]) end
for i = 2, #ARGV do
  local head = string.match(ARGV[i], '^(.*)|open$')
  if head and redis.call('HEXISTS', P .. ':outbox', ARGV[i]) == 1 then
    back(head .. '|resolved')
  end
end
return moved
"""
"""Dead entries (ARGV[2:]) back into the outbox, due at once (whatever a replica's clock
says) with no failed rounds; ARGV[1] (wall ms) is when, from which its age counts anew.
An opening's resolution, given up with it (outbox.lua), comes back with it and waits for it
again; only the entries named are counted."""


ORPHANED: Final = "its opening is undeliverable"
"""Why a resolution is given up with its opening (``outbox.lua``)."""


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
    fence: int
    """When this claim runs out (wall ms): the entry's due score while the claim holds it,
    carried by its settlement so that one arriving after another replica claimed the
    entry again is ignored (``outbox.lua``)."""

    @property
    def sink(self) -> str:
        return self.entry.partition("|")[0]

    @property
    def opening_entry(self) -> str | None:
        """For a resolution, the entry of the same sink and episode that opened it."""
        head, _, status = self.entry.rpartition("|")
        return f"{head}|open" if status == "resolved" else None

    @classmethod
    def from_reply(cls, flat: Sequence[bytes | str]) -> list[ClaimedEntry]:
        return [
            cls(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]


class Outcome(StrEnum):
    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"
    WAIT = "wait"
    """Not tried: due again at ``due_ms``, no failed round counted."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one claimed entry's delivery round ended."""

    entry: str
    outcome: Outcome
    fence: int
    """The claim's ``ClaimedEntry.fence``: the settlement acts only while that claim holds."""
    stream_fields: tuple[str, ...] = ()
    """For the stream sink: the entry to append, written only if the entry is still there."""
    due_ms: int = 0
    reason: str = ""
    settled: bool = False
    """Already applied to the outbox (a remote sink's delivery, settled as it ended)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "e": self.entry,
            "f": self.fence,
            "o": self.outcome.value,
            "x": list(self.stream_fields),
            "due": self.due_ms,
            "r": self.reason,
        }


class Settled(NamedTuple):
    """What one settlement did."""

    done: int
    retried: int
    dead: int
    held: int
    """Hopeless entries kept in the outbox because the dead store is full."""
    released: int
    """Resolutions that waited for their opening, due now that it was delivered."""
    stale: tuple[str, ...] = ()
    """Entries whose results were ignored: their claim had run out and another replica had
    claimed them again (or settled them)."""
    orphans: tuple[str, ...] = ()
    """Resolutions given up because their opening was (``ORPHANED``)."""


class Outbox:
    """Settles delivery rounds and reports, requeues or deletes what is pending or dead."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        stream_key: str,
        stream_maxlen: int,
        *,
        dead_maxlen: int = 10_000,
        hold_ms: int = 900_000,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._stream_key = stream_key
        self._maxlen = stream_maxlen
        self._dead_maxlen = dead_maxlen
        self._hold_ms = hold_ms
        self._script = redis.register_script(SCRIPT)
        self._requeue = redis.register_script(REQUEUE)
        self._claim = redis.register_script(CLAIM)

    @property
    def stream_key(self) -> str:
        return self._stream_key

    async def settle(self, results: Sequence[Settlement], now_ms: int) -> Settled:
        """Apply a round's results in one round trip."""
        if not results:
            return Settled(0, 0, 0, 0, 0)
        request = {
            "now": now_ms,
            "maxlen": self._maxlen,
            "deadmax": self._dead_maxlen,
            "hold": self._hold_ms,
            "orphaned": ORPHANED,
            "results": [r.as_json() for r in results],
        }
        reply = await self._script(
            keys=[self._prefix, self._stream_key], args=[orjson.dumps(request)]
        )
        done, retried, dead, held, released, stale, orphans = reply
        return Settled(
            int(done),
            int(retried),
            int(dead),
            int(held),
            int(released),
            tuple(_text(entry) for entry in stale),
            tuple(_text(entry) for entry in orphans),
        )

    async def claim(self, now_ms: int, limit: int, lease_ms: int) -> list[ClaimedEntry]:
        """Claim up to ``limit`` due entries for ``lease_ms``: one round trip."""
        request = {"now": now_ms, "limit": limit, "lease": lease_ms}
        reply = await self._claim(keys=[self._prefix], args=[orjson.dumps(request)])
        return ClaimedEntry.from_reply(reply)

    async def undelivered_among(self, entries: Sequence[str]) -> dict[str, int]:
        """Those of ``entries`` not delivered: still in the outbox, with the wall ms when
        each is due next, or given up (in the dead store, 0): one round trip."""
        if not entries:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.zscore(f"{self._prefix}:due", entry)
                pipe.hexists(f"{self._prefix}:outbox", entry)
                pipe.hexists(f"{self._prefix}:dead", entry)
            found = await pipe.execute()
        return {
            entry: int(due or 0) if pending else 0
            for entry, due, pending, dead in zip(
                entries, found[::3], found[1::3], found[2::3], strict=True
            )
            if pending or dead
        }

    async def pending(self) -> int:
        """Entries not yet delivered (new, claimed or waiting for a retry)."""
        count: int = await self._redis.hlen(f"{self._prefix}:outbox")  # type: ignore[misc]
        return count

    async def dead(self) -> dict[str, dict[str, Any]]:
        """Entries that were given up on: entry -> {payload, reason, at}."""
        raw = await self._redis.hgetall(f"{self._prefix}:dead")  # type: ignore[misc]
        return {_text(entry): orjson.loads(value) for entry, value in raw.items()}

    async def requeue(self, entries: Sequence[str], now_ms: int) -> int:
        """Move these dead entries back to the outbox, due at once, their age counting from
        ``now_ms`` (they get every retry round again); returns how many were dead here (the
        others are ignored)."""
        moved = 0
        for start in range(0, len(entries), 500):
            part = [str(now_ms), *entries[start : start + 500]]
            moved += int(await self._requeue(keys=[self._prefix], args=part))
        return moved

    async def requeued_at(self, entry: str) -> int:
        """When ``entry`` was last redriven (wall ms), or 0."""
        at = await self._redis.hget(f"{self._prefix}:requeued", entry)  # type: ignore[misc]
        return int(at) if at else 0

    async def delete_dead(self, entries: Sequence[str]) -> int:
        """Remove these dead entries for good; returns how many were there."""
        if not entries:
            return 0
        removed: int = await self._redis.hdel(f"{self._prefix}:dead", *entries)  # type: ignore[misc]
        return removed
