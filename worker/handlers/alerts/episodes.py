"""Event-time episodes in Redis: what the alert handlers share.

A handler turns a batch into *subjects* (a SIM, or a fleet's network, per alert kind),
each with *hits* (events that count towards an episode: rejections, failures, accepted
attachments, blocked events) and *clears* (events that end one: a successful attachment,
a data session, an unblocked event). ``EpisodeStore.apply`` sends all of a batch's
subjects to ``event_time.lua`` + ``episodes.lua`` in **one** EVALSHA, which atomically

- de-duplicates hits by member (event SIDs), so duplicates, replays and both vendor
  envelopes of one event count once (hits are kept ``max_lateness`` past event time);
- stores a subject's hits and clears and *walks* them in event-time order once event
  time has passed them by ``quiet_grace``, so the episodes below are those of the sorted
  stream whatever order the shards delivered in (events arriving behind the walk are late
  and applied as they come);
- opens an episode when ``threshold`` hits fall within ``window`` of event time with no
  clear between them, and extends it with later hits (also ones that arrive late);
- ends it at the first clear after its start, or when quiet for ``window`` after its
  last hit; either way once *event time* has passed that end by ``quiet_grace``. Event
  time is the progress of the slowest shard that delivered a batch within ``shard_idle``
  (or a ``tick``'s time, if later), so one shard running ahead closes nothing early;
  after a start nothing closes until every shard had ``shard_warmup`` to report;
- records every transition and, unless the episode's newest event is older than
  ``stale_after`` (wall clock), writes it to the outbox once per sink, in the same atomic
  step; an episode recorded as stale is announced later if a recent event extends it;
- claims due outbox entries for delivery (see ``worker.handlers.alerts.dispatch``).

An episode's identity is fixed when it opens (kind, subject, its first event time then),
so every replica and retry names it the same; its range and counts keep growing with
late events. Tolerance: events may arrive up to ``max_lateness`` behind event time
(shuffling, retries, a shard behind the others). Beyond that, counts in a resolved
alert may be short, and an older episode whose events arrive only after a newer episode
of the same subject opened is not alerted (one episode per subject is tracked): such
cases can miss an alert, never duplicate one. A resolved episode is final: late events
(and late clears) add nothing to it, and new episodes start after it, so no two alerts
of a subject count the same event. A clear arriving late inside an open episode ends it
there (resolved no earlier than it opened); the hits after the clear may open a new one.

The scripts' headers document the Redis key layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Final

import orjson

from worker.handlers.alerts.model import AlertStatus, alert_id
from worker.handlers.alerts.outbox import ClaimedEntry

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.handlers.alerts.settings import AlertSettings

_LUA: Final = resources.files("worker.handlers.alerts")
SCRIPT: Final = "\n".join(
    _LUA.joinpath(name).read_text("utf-8")
    for name in ("event_time.lua", "claim.lua", "episodes.lua")
)
"""One script: event time (shard watermarks, warm-up), then episode detection, then claims."""
_BY_TIME = itemgetter(1)


@dataclass(frozen=True, slots=True)
class Rule:
    """How one alert kind detects episodes, for one fleet."""

    kind: str
    threshold: int
    window_ms: int
    """Hits must fall within this much event time; 0 means unbounded (and never quiet)."""
    distinct: bool = False
    """Count distinct members (SIMs) by their newest hit, instead of events."""
    quiet: bool = True
    """Close the episode once no hit came for ``window_ms`` of event time."""

    def request(self) -> list[Any]:
        """The rule as the script reads it: ``[kind, threshold, window, distinct (0 or 1),
        quiet (0 or 1, never with an unbounded window)]``."""
        return [
            self.kind,
            self.threshold,
            self.window_ms,
            int(self.distinct),
            int(self.quiet and self.window_ms > 0),
        ]


@dataclass(slots=True)
class Subject:
    """One subject's hits and clears from one batch."""

    rule: Rule
    subject: str
    group: str = ""
    meta: str = ""
    hits: list[tuple[str, int, str, str]] = field(default_factory=list)
    clears: list[int] = field(default_factory=list)

    def hit(self, member: str, ts: int, tags: str = "", info: str = "") -> None:
        """A counting event: ``member`` is its event SID (a SIM SID in distinct mode);
        ``tags`` are tab-separated (see ``worker.handlers.alerts.render``)."""
        self.hits.append((member, ts, tags, info))

    def clear(self, ts: int) -> None:
        self.clears.append(ts)

    def request(self, rule_index: int) -> list[Any]:
        """The subject as the script reads it: ``[rule, subject, group, meta, hits,
        clears]``, ``rule`` an index into the request's rules, hits in time order, clears
        their distinct times as text, newest first, each followed by a comma (the script
        keeps most of them as text, and the numbers of a JSON array cost it more to
        decode)."""
        clears = sorted(set(self.clears), reverse=True)
        return [
            rule_index,
            self.subject,
            self.group,
            self.meta,
            sorted(self.hits, key=_BY_TIME),
            ",".join(map(str, clears)) + "," if clears else "",
        ]


class Subjects:
    """The subjects of one batch, found or created by kind and subject."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Subject] = {}

    def get(self, rule: Rule, subject: str) -> Subject:
        key = (rule.kind, subject)
        found = self._by_key.get(key)
        if found is None:
            found = self._by_key[key] = Subject(rule, subject)
        return found

    def __iter__(self) -> Iterator[Subject]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)


@dataclass(frozen=True, slots=True)
class Transition:
    """An episode opening or resolving, as the episode script recorded it."""

    kind: str
    subject: str
    group: str
    meta: Mapping[str, Any]
    key: int
    """The episode's first event time when it opened: with kind and subject, its identity."""
    status: AlertStatus
    at: int
    """Event time of the transition (threshold met, or the end)."""
    opened: int
    first: int
    last: int
    reason: str | None
    count: int
    tags: Mapping[str, int]
    info: Mapping[str, Any]
    sent: bool
    """False when it was recorded but not sent (stale in event time)."""
    created_ms: int
    """Wall clock when it was recorded."""

    @property
    def id(self) -> str:
        return alert_id(self.kind, self.subject, self.key)

    @property
    def resolved(self) -> bool:
        return self.status is AlertStatus.RESOLVED

    @classmethod
    def parse(cls, payload: bytes | str) -> Transition:
        raw = orjson.loads(payload)
        meta, info = raw.get("m") or "", raw.get("info") or ""
        tags = raw.get("tags") or {}
        return cls(
            kind=raw["k"],
            subject=raw["s"],
            group=raw.get("g") or "",
            meta=orjson.loads(meta) if meta else {},
            key=int(raw["key"]),
            status=AlertStatus(raw["ev"]),
            at=int(raw["at"]),
            opened=int(raw["opened"]),
            first=int(raw["first"]),
            last=int(raw["last"]),
            reason=raw.get("why") or None,
            count=int(raw["n"]),
            tags={str(tag): int(count) for tag, count in tags.items()},
            info=orjson.loads(info) if info else {},
            sent=bool(raw["sent"]),
            created_ms=int(raw["cat"]),
        )

    def tag_counts(self, prefix: str) -> list[tuple[str, int]]:
        """``(rest, count)`` of the tags starting with ``prefix``, most frequent first."""
        found = [(tag[len(prefix) :], n) for tag, n in self.tags.items() if tag.startswith(prefix)]
        return sorted(found, key=lambda item: (-item[1], item[0]))


@dataclass(frozen=True, slots=True)
class Applied:
    """What one script call did: transitions recorded, outbox entries claimed, and whether
    it walked or closed as many subjects as one call takes (more may be due)."""

    transitions: list[Transition]
    claimed: list[ClaimedEntry]
    more: bool = False


class EpisodeStore:
    """Runs the episode script for one handler: one round trip per call."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        settings: AlertSettings,
        *,
        sinks: Sequence[str],
        lease_ms: int,
    ) -> None:
        self._prefix = prefix
        self._script = redis.register_script(SCRIPT)
        self._sinks = list(sinks)
        self._lease_ms = lease_ms
        self._lateness_ms = _ms(settings.max_lateness.total_seconds())
        self._grace_ms = _ms(settings.quiet_grace.total_seconds())
        self._idle_ms = _ms(settings.shard_idle.total_seconds())
        self._warmup_ms = _ms(settings.shard_warmup.total_seconds())
        self._ttl = max(1, int(settings.retention.total_seconds()))
        stale = settings.stale_after
        self._stale_ms = None if stale is None else _ms(stale.total_seconds())
        self._kept = False
        """Whether this process's first call asked the script to keep every open
        episode's state (``keep``), which states saved by older versions may not be."""

    @property
    def prefix(self) -> str:
        """The handler's key prefix: every key the store uses starts with it."""
        return self._prefix

    async def apply(
        self,
        subjects: Iterable[Subject],
        *,
        now_ms: int,
        shard: str = "",
        newest_ms: int = 0,
        tick_ms: int = 0,
        claim: int = 0,
    ) -> Applied:
        """Apply a batch's subjects (each kind and subject once, as ``Subjects`` gives
        them), record that ``shard`` reached ``newest_ms`` (or that every shard reached
        ``tick_ms``), close what event time has passed, and claim up to ``claim`` due outbox
        entries."""
        index: dict[Rule, int] = {}
        rules: list[list[Any]] = []
        subs: list[list[Any]] = []
        seen: set[tuple[str, str]] = set()
        for subject in subjects:
            rule = subject.rule
            name = (rule.kind, subject.subject)
            if name in seen:  # the script reads and writes a subject's state once a call
                raise ValueError(f"subject {name} given twice in one call: merge them first")
            seen.add(name)
            at = index.get(rule)
            if at is None:
                at = index[rule] = len(rules)
                rules.append(rule.request())
            subs.append(subject.request(at))
        request = {
            "now": now_ms,
            "fresh": 0 if self._stale_ms is None else now_ms - self._stale_ms,
            "shard": shard,
            "wm": newest_ms,
            "tick": tick_ms,
            "idle": self._idle_ms,
            "warmup": self._warmup_ms,
            "grace": self._grace_ms,
            "ttl": self._ttl,
            "sinks": self._sinks,
            "claim": claim,
            "lease": self._lease_ms,
            "late": self._lateness_ms,
            "rules": rules,
            "subs": subs,
            "keep": 0 if self._kept else 1,
        }
        reply = await self._script(keys=[self._prefix], args=[orjson.dumps(request)])
        self._kept = True
        recorded, claimed, more = reply
        return Applied(
            transitions=[Transition.parse(item) for item in recorded],
            claimed=ClaimedEntry.from_reply(claimed),
            more=more == 1,
        )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)
