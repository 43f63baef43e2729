"""Clears of subjects without state: one log per subject (``P:logs``), not a sorted set.

A SIM's clears come with nearly every event it sends. While its subject has no state the
episode script keeps them in a log read and written once per batch, and takes them into the
subject's sorted set of clears (``P:c``) when a hit gives it state. These tests hold the log
to what the sorted set did: the same clears, trimmed as the set was, whatever the order and
however often they came; a late hit between logged clears bounded by them; expired logs
(their expiries in ``P:logt``) counted as none and deleted.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
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


def store(redis: Redis, warmup: timedelta = timedelta(0)) -> EpisodeStore:
    settings = AlertSettings(
        sinks="log",
        stale_after=None,
        shard_warmup=warmup,
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
    """The clears a subject's log holds, oldest first, or None without a log."""
    value = await redis.hget(f"{PREFIX}:logs", f"{RULE.kind}\t{subject}")
    if value is None:
        return None
    text = value.decode()
    assert text.endswith(",")
    times = [int(token) for token in text.split(",")[:-1]]
    assert times == sorted(set(times), reverse=True)  # distinct, newest first
    return sorted(times)


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
    set was trimmed, so the log stays short; the clears a hit takes into the sorted set are
    those the set would have held."""
    episodes = store(redis)
    reference: set[int] = set()
    longest = 0
    for batch in range(60):
        times = [T + batch * 60 * SECOND + offset * SECOND for offset in (40, 0, 20)]
        if batch % 7 == 3 and batch < 55:  # a batch behind: its cut lies below earlier ones
            times = [ts - 5 * 60 * SECOND for ts in times]
        await apply(episodes, clears={"sim:B": times})
        reference |= set(times)
        cut = max(times) - LATENESS_MS  # event time is the one shard's newest event
        reference = {ts for ts in reference if ts >= cut}
        assert await logged(redis, "sim:B") == sorted(reference)
        value = await redis.hget(f"{PREFIX}:logs", "one\tsim:B")
        assert value is not None
        longest = max(longest, len(value))
    assert longest <= 14 * 12  # the clears of the last lateness, not 60 batches' worth

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


async def test_a_windowed_rule_cuts_its_log_a_window_further_back(redis: Redis) -> None:
    """The cut is event time less the lateness and the rule's window (hits a window apart
    still chain), as the sorted set was trimmed."""
    rule = Rule("storm", threshold=3, window_ms=60 * SECOND)
    episodes = store(redis)
    for batch in range(10):
        subjects = Subjects()
        newest = T + batch * 60 * SECOND
        subjects.get(rule, "sim:W").clear(newest)
        await episodes.apply(subjects, now_ms=NOW, shard="s0", newest_ms=newest)
    value = await redis.hget(f"{PREFIX}:logs", "storm\tsim:W")
    assert value is not None
    held = sorted(int(t) for t in value.decode().split(",")[:-1])
    assert held == [T + m * 60 * SECOND for m in range(6, 10)]  # from 9 min less 3


async def test_a_log_beside_state_is_taken_in_and_ends_the_episode(redis: Redis) -> None:
    """A subject with state never hides clears in a log: one written beside its state (by a
    replica whose clock is behind, or while an earlier version gave it state) is taken in
    with the next batch and walked like the batch's own clears; an expired one is deleted."""
    episodes = store(redis)
    found = await apply(episodes, hits={"sim:F": [("E5", T + 5 * SECOND)]})
    assert [t.status for t in found] == [AlertStatus.OPEN]
    logs, times = f"{PREFIX}:logs", f"{PREFIX}:logt"
    await redis.hset(logs, "one\tsim:F", f"{T + 9 * SECOND},")
    await redis.zadd(times, {"one\tsim:F": NOW + LOG_TTL_MS})
    found = await apply(episodes, clears={"sim:F": [T + 20 * SECOND]})
    assert [(t.status, t.at) for t in found] == [(AlertStatus.RESOLVED, T + 9 * SECOND)]
    assert await redis.hexists(logs, "one\tsim:F") == 0
    assert await clear_set(redis, "sim:F") == [T + 9 * SECOND, T + 20 * SECOND]

    await redis.hset(logs, "one\tsim:F", f"{T + 30 * SECOND},")
    await redis.zadd(times, {"one\tsim:F": NOW - 1})  # expired
    await apply(episodes, clears={"sim:F": [T + 40 * SECOND]})
    assert await redis.hexists(logs, "one\tsim:F") == 0
    assert await redis.zscore(times, "one\tsim:F") is None
    assert await clear_set(redis, "sim:F") == [T + 9 * SECOND, T + 20 * SECOND, T + 40 * SECOND]


async def test_a_hit_and_clears_in_the_batch_that_takes_the_log(redis: Redis) -> None:
    """A subject with a log whose batch brings a hit and clears: the log's clears and the
    batch's both bound the episode."""
    episodes = store(redis)
    await apply(episodes, clears={"sim:G": [T + 10 * SECOND, T + 30 * SECOND]})
    found = await apply(
        episodes,
        clears={"sim:G": [T + 20 * SECOND]},
        hits={"sim:G": [("E6", T + 15 * SECOND), ("E7", T + 25 * SECOND)]},
    )
    assert [(t.status, t.first, t.at) for t in found] == [
        (AlertStatus.OPEN, T + 15 * SECOND, T + 15 * SECOND),
        (AlertStatus.RESOLVED, T + 15 * SECOND, T + 20 * SECOND),
        (AlertStatus.OPEN, T + 25 * SECOND, T + 25 * SECOND),
        (AlertStatus.RESOLVED, T + 25 * SECOND, T + 30 * SECOND),
    ]
    assert await clear_set(redis, "sim:G") == [T + 10 * SECOND, T + 20 * SECOND, T + 30 * SECOND]


async def test_the_log_is_the_same_whatever_the_order_and_repeats(redis: Redis) -> None:
    """Before warm-up ends nothing is cut; a log then holds each clear once, newest first,
    whether the clears came in order, out of order or again (a replay)."""
    episodes = store(redis, warmup=timedelta(hours=1))
    times = [T + SECOND, T + 2 * SECOND, T + 3 * SECOND, T + 4 * SECOND]
    for part in ([times[1]], [times[0], times[3]], [times[2]], times, [times[3]]):
        await apply(episodes, clears={"sim:H": part})
    assert (
        await redis.hget(f"{PREFIX}:logs", "one\tsim:H")
        == (",".join(str(ts) for ts in reversed(times)) + ",").encode()
    )


async def test_expired_logs_are_deleted_a_slice_per_call(redis: Redis) -> None:
    """Expired logs are deleted oldest expiry first, as many a call as it has subjects (at
    least 50), until none is left; live ones stay."""
    episodes = store(redis)
    logs, times = f"{PREFIX}:logs", f"{PREFIX}:logt"
    fields = [f"one\tsim:X{i}" for i in range(3000)]
    await redis.hset(logs, mapping=dict.fromkeys(fields, f"{T},"))
    await redis.zadd(times, {field: NOW - 1 - i for i, field in enumerate(fields)})
    calls = 0
    while await redis.hlen(logs) > 1 and calls < 100:
        await apply(episodes, clears={"sim:live": [T + calls]})
        calls += 1
    assert await redis.hkeys(logs) == [b"one\tsim:live"]
    assert await redis.zrange(times, 0, -1) == [b"one\tsim:live"]
    assert calls == 60  # 3,000 at 50 a call


async def test_a_subject_given_twice_in_one_call_is_refused(redis: Redis) -> None:
    """The script reads and writes each subject once a call: two entries for one subject
    would lose what the first did, so they are refused."""
    episodes = store(redis)
    first, second = Subjects(), Subjects()
    first.get(RULE, "sim:D").clear(T + 10 * SECOND)
    second.get(RULE, "sim:D").hit("E8", T + 5 * SECOND)
    with pytest.raises(ValueError, match="twice"):
        await episodes.apply([*first, *second], now_ms=NOW, shard="s0", newest_ms=T)


async def test_a_short_retention_never_expires_the_logs_before_their_time(redis: Redis) -> None:
    """The hash of logs lives a retention after its last write, but never less than the
    logs it holds: a retention shorter than a log's life does not drop it."""
    settings = AlertSettings(
        sinks="log",
        stale_after=None,
        shard_warmup=timedelta(0),
        quiet_grace=timedelta(0),
        max_lateness=timedelta(milliseconds=LATENESS_MS),
        retention=timedelta(seconds=2),
    )
    episodes = EpisodeStore(redis, PREFIX, settings, sinks=["log"], lease_ms=1000)
    await apply(episodes, clears={"sim:R": [T + SECOND]})
    assert await redis.ttl(f"{PREFIX}:logs") >= LOG_TTL_MS // 1000 - 1


async def test_a_field_without_an_expiry_counts_as_no_log(redis: Redis) -> None:
    """A field of the hash without its expiry (written by something else) is not read as
    a log: the subject's clears start a new one."""
    episodes = store(redis)
    await redis.hset(f"{PREFIX}:logs", "one\tsim:Y", "garbage")
    await apply(episodes, clears={"sim:Y": [T + SECOND]})
    assert await logged(redis, "sim:Y") == [T + SECOND]


async def test_a_batch_between_logged_clears_is_merged_in_order(redis: Redis) -> None:
    """Clears that interleave with logged ones, with cuts active, leave the log exactly as
    the sorted set would be: each once, newest first, none below the cut."""
    episodes = store(redis)
    await apply(episodes, clears={"sim:M": [T + 10 * SECOND, T + 30 * SECOND]})
    await apply(episodes, clears={"sim:M": [T + 20 * SECOND, T + 40 * SECOND, T + 10 * SECOND]})
    expected = [T + 40 * SECOND, T + 30 * SECOND, T + 20 * SECOND, T + 10 * SECOND]
    assert (
        await redis.hget(f"{PREFIX}:logs", "one\tsim:M")
        == (",".join(map(str, expected)) + ",").encode()
    )
    late = T + 40 * SECOND + LATENESS_MS - 15 * SECOND  # cuts below T + 25 s
    await apply(episodes, clears={"sim:M": [T + 35 * SECOND, late]})
    assert (
        await redis.hget(f"{PREFIX}:logs", "one\tsim:M")
        == (f"{late},{T + 40 * SECOND},{T + 35 * SECOND},{T + 30 * SECOND},").encode()
    )


async def test_a_log_is_live_until_its_expiry_to_the_millisecond(redis: Redis) -> None:
    """A log whose expiry equals the call's time still counts (a TTL runs out after its
    last millisecond); a taken log leaves no expiry behind."""
    episodes = store(redis)
    await apply(episodes, clears={"sim:N": [T + 10 * SECOND]})
    expiry = await redis.zscore(f"{PREFIX}:logt", "one\tsim:N")
    assert expiry == NOW + LOG_TTL_MS
    found = await apply(episodes, hits={"sim:N": [("E9", T + 5 * SECOND)]}, now=NOW + LOG_TTL_MS)
    assert [(t.status, t.at) for t in found] == [
        (AlertStatus.OPEN, T + 5 * SECOND),
        (AlertStatus.RESOLVED, T + 10 * SECOND),
    ]
    assert await redis.hexists(f"{PREFIX}:logs", "one\tsim:N") == 0
    assert await redis.zscore(f"{PREFIX}:logt", "one\tsim:N") is None


async def test_the_sweep_deletes_as_many_logs_as_the_call_has_subjects(redis: Redis) -> None:
    """A call with many subjects deletes as many expired logs, so the deletes keep up with
    the logs calls write."""
    episodes = store(redis)
    logs, times = f"{PREFIX}:logs", f"{PREFIX}:logt"
    fields = [f"one\tsim:X{i}" for i in range(500)]
    await redis.hset(logs, mapping=dict.fromkeys(fields, f"{T},"))
    await redis.zadd(times, dict.fromkeys(fields, NOW - 1))
    live = {f"sim:L{i}": [T + SECOND] for i in range(200)}
    await apply(episodes, clears=live)
    assert await redis.hlen(logs) == 500 - 200 + 200
