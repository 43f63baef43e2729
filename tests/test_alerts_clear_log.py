"""Clears of subjects without state: one log per subject (``P:logs``), not a sorted set.

A SIM's clears come with nearly every event it sends. While its subject has no state the
episode script keeps them in a log read and written once per batch, and takes them into the
subject's sorted set of clears (``P:c``) when a hit gives it state. These tests hold the log
to what the sorted set did: the same clears taken in (cuts applied as the set was trimmed),
a late hit between logged clears bounded by them, expired logs counted as none and swept.
"""

from __future__ import annotations

from datetime import timedelta

from redis.asyncio import Redis

from worker.handlers.alerts.episodes import EpisodeStore, Rule, Subjects, Transition
from worker.handlers.alerts.model import AlertStatus
from worker.handlers.alerts.settings import AlertSettings

PREFIX = "{t}:alerts:clear-log"
RULE = Rule("one", threshold=1, window_ms=0, quiet=False)
LATENESS_MS = 120_000
LOG_TTL_MS = (LATENESS_MS // 1000 + 60) * 1000
"""How long a log lives after its last batch: what the sorted set's TTL was."""
T = 1_700_000_000_000
NOW = 1_800_000_000_000
SECOND = 1000


def store(redis: Redis) -> EpisodeStore:
    settings = AlertSettings(
        sinks="log",
        stale_after=None,
        shard_warmup=timedelta(0),
        quiet_grace=timedelta(0),
        max_lateness=timedelta(milliseconds=LATENESS_MS),
    )
    return EpisodeStore(redis, PREFIX, settings, sinks=["log"], lease_ms=1000)


async def apply(
    episodes: EpisodeStore,
    *,
    clears: dict[str, list[int]] | None = None,
    hits: dict[str, list[tuple[str, int]]] | None = None,
    now: int = NOW,
) -> list[Transition]:
    subjects = Subjects()
    newest = 0
    for subject, times in (clears or {}).items():
        for ts in times:
            subjects.get(RULE, subject).clear(ts)
            newest = max(newest, ts)
    for subject, members in (hits or {}).items():
        for member, ts in members:
            subjects.get(RULE, subject).hit(member, ts)
            newest = max(newest, ts)
    applied = await episodes.apply(subjects, now_ms=now, shard="s0", newest_ms=newest)
    return applied.transitions


async def logged(redis: Redis, subject: str) -> list[int] | None:
    """The clears a subject's log holds, cuts applied, or None without a log."""
    value = await redis.hget(f"{PREFIX}:logs", f"{RULE.kind}\t{subject}")
    if value is None:
        return None
    held: set[int] = set()
    for token in value.decode().split(";", 1)[1].split(",")[:-1]:
        if token.startswith("~"):
            held = {ts for ts in held if ts >= int(token[1:])}
        else:
            held.add(int(token))
    return sorted(held)


async def clear_set(redis: Redis, subject: str) -> list[int]:
    found = await redis.zrange(f"{PREFIX}:c:{RULE.kind}:{subject}", 0, -1, withscores=True)
    return [int(score) for _, score in found]


async def test_a_late_hit_between_logged_clears_is_bounded_by_them(redis: Redis) -> None:
    """Clears of a subject without state go to its log, not to a sorted set; a hit that
    arrives later between two of them opens an episode the next one ends."""
    episodes = store(redis)
    times = [T + 10 * SECOND, T + 20 * SECOND, T + 30 * SECOND]
    assert await apply(episodes, clears={"sim:A": times}) == []
    assert await logged(redis, "sim:A") == times
    assert await redis.exists(f"{PREFIX}:c:one:sim:A") == 0

    found = await apply(episodes, hits={"sim:A": [("E1", T + 15 * SECOND)]})
    assert [(t.status, t.first, t.last, t.at) for t in found] == [
        (AlertStatus.OPEN, T + 15 * SECOND, T + 15 * SECOND, T + 15 * SECOND),
        (AlertStatus.RESOLVED, T + 15 * SECOND, T + 15 * SECOND, T + 20 * SECOND),
    ]
    assert await logged(redis, "sim:A") is None
    assert await clear_set(redis, "sim:A") == times


async def test_the_log_drops_clears_as_the_sorted_set_was_trimmed(redis: Redis) -> None:
    """Each batch cuts the clears older than event time less the lateness, as the sorted
    set was trimmed; the log is rewritten when it grows, so it stays short; the clears a
    hit takes into the sorted set are those the set would have held."""
    episodes = store(redis)
    reference: set[int] = set()
    longest = 0
    for batch in range(60):
        times = [T + batch * 60 * SECOND + offset * SECOND for offset in (40, 0, 20)]
        await apply(episodes, clears={"sim:B": times})
        reference |= set(times)
        cut = max(times) - LATENESS_MS  # event time is the one shard's newest event
        reference = {ts for ts in reference if ts >= cut}
        assert await logged(redis, "sim:B") == sorted(reference)
        value = await redis.hget(f"{PREFIX}:logs", "one\tsim:B")
        assert value is not None
        longest = max(longest, len(value))
    assert longest < 600  # rewritten past 256 bytes: not 60 batches of clears and cuts

    late = T + 59 * 60 * SECOND - 50 * SECOND
    found = await apply(episodes, hits={"sim:B": [("E2", late)]})
    assert [t.status for t in found] == [AlertStatus.OPEN, AlertStatus.RESOLVED]
    assert found[1].at == min(ts for ts in reference if ts >= late)
    assert await clear_set(redis, "sim:B") == sorted(reference)
    ttl = await redis.pttl(f"{PREFIX}:c:one:sim:B")
    assert ttl > LOG_TTL_MS  # saved with the subject's state: the retention's TTL now


async def test_expired_logs_count_as_none_and_are_swept(redis: Redis) -> None:
    """A log lives as long as the sorted set did after its last batch; then it is gone
    for the script and deleted by the sweep of a later call."""
    episodes = store(redis)
    await apply(episodes, clears={"sim:C": [T + SECOND]})
    await apply(episodes, clears={"sim:D": [T + 2 * SECOND]}, now=NOW + LOG_TTL_MS)
    assert await logged(redis, "sim:C") == [T + SECOND]  # not expired yet, to the ms

    await apply(episodes, clears={"sim:D": [T + 3 * SECOND]}, now=NOW + LOG_TTL_MS + 1)
    assert await logged(redis, "sim:C") is None
    assert await logged(redis, "sim:D") == [T + 2 * SECOND, T + 3 * SECOND]

    # A hit now finds no clear before it: nothing bounds the episode it opens.
    found = await apply(
        episodes, hits={"sim:C": [("E3", T + 2 * SECOND)]}, now=NOW + LOG_TTL_MS + 2
    )
    assert [t.status for t in found] == [AlertStatus.OPEN]
    assert await clear_set(redis, "sim:C") == []


async def test_a_sorted_set_of_clears_without_state_moves_into_the_log(redis: Redis) -> None:
    """Clears a sorted set still holds for a subject without state (its state expired
    first, or an earlier version kept them there) join the log with the batch's."""
    episodes = store(redis)
    key = f"{PREFIX}:c:one:sim:E"
    await redis.zadd(key, {str(T + SECOND): T + SECOND, str(T + 2 * SECOND): T + 2 * SECOND})
    await redis.expire(key, 60)
    await apply(episodes, clears={"sim:E": [T + 4 * SECOND]})
    assert await redis.exists(key) == 0
    assert await logged(redis, "sim:E") == [T + SECOND, T + 2 * SECOND, T + 4 * SECOND]

    found = await apply(episodes, hits={"sim:E": [("E4", T + 3 * SECOND)]})
    assert [(t.status, t.at) for t in found] == [
        (AlertStatus.OPEN, T + 3 * SECOND),
        (AlertStatus.RESOLVED, T + 4 * SECOND),
    ]
    assert await clear_set(redis, "sim:E") == [T + SECOND, T + 2 * SECOND, T + 4 * SECOND]
