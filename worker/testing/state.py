"""What a handler left in Redis: a comparable snapshot of the keys under a prefix, and a
readable diff of two snapshots.

A snapshot maps each key (without the prefix) to its ``KeyState``: the Redis type and the
value read by type (strings and hashes as text where they are UTF-8, sets and sorted sets
in order, streams as their entries' fields without their time-based ids), and whether the
key expires. Expiry times are left out: they move with the wall clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from redis.asyncio import Redis

MAX_KEYS_SHOWN: Final = 20
MAX_ITEMS_SHOWN: Final = 8
_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "*?[]\\"})


@dataclass(frozen=True, slots=True)
class KeyState:
    """One key's type, value and whether it has a TTL."""

    type: str
    value: Any
    expires: bool

    def describe(self) -> str:
        return f"{self.type}{', expires' if self.expires else ''}"


State = dict[str, KeyState]
"""Key (without the prefix) -> its state."""


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return value
    return value


async def _read(redis: Redis, key: bytes, kind: str) -> Any:
    if kind == "string":
        return _text(await redis.get(key))
    if kind == "hash":
        found: dict[Any, Any] = await redis.hgetall(key)  # type: ignore[arg-type,misc]
        return {_text(k): _text(v) for k, v in sorted(found.items())}
    if kind == "set":
        members: set[Any] = await redis.smembers(key)  # type: ignore[misc]
        return sorted(_text(m) for m in members)
    if kind == "zset":
        scored = await redis.zrange(key, 0, -1, withscores=True)
        return [(_text(member), score) for member, score in scored]
    if kind == "list":
        items: list[Any] = await redis.lrange(key, 0, -1)  # type: ignore[misc]
        return [_text(item) for item in items]
    if kind == "stream":
        entries = await redis.xrange(key)
        return [{_text(k): _text(v) for k, v in fields.items()} for _, fields in entries]
    return await redis.dump(key)  # another type: its serialised form


async def snapshot(redis: Redis, prefix: str) -> State:
    """Every key that starts with ``prefix``, read by type (see the module docstring)."""
    state: State = {}
    async for key in redis.scan_iter(match=prefix.translate(_GLOB_SPECIAL) + "*", count=1000):
        kind = _text(await redis.type(key))
        if kind == "none":  # expired or deleted meanwhile
            continue
        value = await _read(redis, key, kind)
        ttl = await redis.pttl(key)
        state[str(_text(key))[len(prefix) :]] = KeyState(kind, value, ttl >= 0)
    return dict(sorted(state.items()))


async def delete(redis: Redis, prefix: str) -> int:
    """Delete every key that starts with ``prefix``; how many there were."""
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=prefix.translate(_GLOB_SPECIAL) + "*", count=1000):
        batch.append(key)
        if len(batch) == 500:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _items_diff(a: Any, b: Any, left: str, right: str) -> list[str]:
    """What differs inside one key's value: fields of a hash, members of a set."""
    if isinstance(a, dict) and isinstance(b, dict):
        lines = []
        for field in sorted(set(a) | set(b), key=str):
            if a.get(field) != b.get(field):
                was = _short(a[field]) if field in a else "missing"
                now = _short(b[field]) if field in b else "missing"
                lines.append(f"field {field!r}: {was} {left}, {now} {right}")
        return lines
    if isinstance(a, list) and isinstance(b, list) and a and b and not isinstance(a[0], dict):
        only_a = [x for x in a if x not in b]
        only_b = [x for x in b if x not in a]
        if only_a or only_b:
            return [
                *(f"only {left}: {_short(x)}" for x in only_a),
                *(f"only {right}: {_short(x)}" for x in only_b),
            ]
    return [f"{left}: {_short(a, 400)}", f"{right}: {_short(b, 400)}"]


def diff(
    a: Mapping[str, KeyState], b: Mapping[str, KeyState], left: str = "a", right: str = "b"
) -> str:
    """The differences between two snapshots, one key per paragraph ("" if equal)."""
    lines: list[str] = []
    keys = sorted(set(a) | set(b))
    changed = [key for key in keys if a.get(key) != b.get(key)]
    for key in changed[:MAX_KEYS_SHOWN]:
        if key not in b:
            lines.append(f"  {key} ({a[key].describe()}): only {left}")
        elif key not in a:
            lines.append(f"  {key} ({b[key].describe()}): only {right}")
        else:
            was, now = a[key], b[key]
            if was.type != now.type or was.expires != now.expires:
                lines.append(f"  {key}: {was.describe()} {left}, {now.describe()} {right}")
                if was.type != now.type:
                    continue
            else:
                lines.append(f"  {key} ({was.describe()}):")
            inner = _items_diff(was.value, now.value, left, right) if was.value != now.value else []
            lines.extend(f"      {line}" for line in inner[:MAX_ITEMS_SHOWN])
            if len(inner) > MAX_ITEMS_SHOWN:
                lines.append(f"      ... and {len(inner) - MAX_ITEMS_SHOWN} more")
    if len(changed) > MAX_KEYS_SHOWN:
        lines.append(f"  ... and {len(changed) - MAX_KEYS_SHOWN} more keys")
    return "\n".join(lines)
