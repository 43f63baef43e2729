"""The base of the alert handlers: batch -> subjects -> one script call -> dispatch.

A subclass says which events are hits and clears of which subjects (``collect``, or
``collect_kinds``, which is told each event's kind) and how a transition reads as an alert
(``render``). Everything else is shared: settings, the
episode store, the outbox, the sinks and the dispatcher.

Besides the ``Handler`` methods it offers ``tick(now)``, which the consumer may call
periodically when its shards are caught up (``now`` = wall clock, which is then the event
time too): it closes episodes that went quiet while no events arrived and retries pending
deliveries. ``flush()`` delivers what is due now and waits for it (tests, and a run
that ends caught up: the ``Flushes`` hook).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, ClassVar

import orjson
import structlog

from worker.events.records import ConnectionData, ConnectionEvent, EventKind
from worker.events.times import unix_ms
from worker.handlers.alerts.dispatch import SEND_MARGIN_MS, Dispatcher, RetryPolicy
from worker.handlers.alerts.episodes import EpisodeStore, Rule, Subject, Subjects, Transition
from worker.handlers.alerts.model import Alert, AlertStatus, to_ms
from worker.handlers.alerts.outbox import ClaimedEntry, Outbox
from worker.handlers.alerts.settings import AlertSettings, Thresholds
from worker.handlers.alerts.sinks import AlertSink, load_sink
from worker.handlers.base import Batch, Gauge, HandlerContext

CLOSE_GRACE_S = 5.0
"""At shutdown, queued deliveries get this long; the rest are delivered after their lease
(by another replica or the next start), with the same idempotency keys."""
TICK_CALLS = 200
"""Script calls one ``tick`` makes at most while subjects stay due: each walks up to 1,000
subjects with stored events and closes up to 1,000 episodes, so a tick gets through 200,000
of each, within the consumer's handler timeout (a live worker's next tick goes on from
there)."""


def window_ms(window: timedelta) -> int:
    return round(window.total_seconds() * 1000)


def build_sinks(settings: AlertSettings) -> dict[str, AlertSink]:
    """The enabled sinks by name. (The webhook signs with the real wall clock.)"""
    return {name: load_sink(name)(settings) for name in settings.sinks}


class AlertHandler(ABC):
    """Shared machinery of the ``rejections``, ``data_limit`` and ``attach_loops`` handlers."""

    name: str

    def __init__(
        self,
        context: HandlerContext[AlertSettings],
        *,
        settings: AlertSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if self._collects_kinds is None:
            raise TypeError(f"{type(self).__name__} must provide collect or collect_kinds")
        self.settings = settings if settings is not None else context.settings
        self._clock = clock
        self._delay_ms = round(self.settings.upstream_delay.total_seconds() * 1000)
        self._rules: dict[str | None, tuple[Rule, ...]] = {}
        prefix = f"{context.key_prefix}:alerts:{self.name}"
        webhook = self.settings.webhook
        # A round's resolution may wait for its opening's send before its own: two sends,
        # each started only with the margin left (the dispatcher checks this bound).
        send_ms = round(webhook.round_seconds * 1000)
        lease_ms = 2 * (send_ms + SEND_MARGIN_MS)
        self.sinks = build_sinks(self.settings)
        self.store = EpisodeStore(
            context.redis, prefix, self.settings, sinks=list(self.sinks), lease_ms=lease_ms
        )
        self.outbox = Outbox(
            context.redis,
            prefix,
            f"{context.key_prefix}:{self.settings.stream_key}",
            self.settings.stream_maxlen,
            dead_maxlen=self.settings.dead_maxlen,
            hold_ms=round(webhook.retry_cap.total_seconds() * 1000),
        )
        self.dispatcher = Dispatcher(
            outbox=self.outbox,
            sinks=self.sinks,
            render=self.render,
            retry=RetryPolicy(webhook.retry_base, webhook.retry_cap, webhook.max_age),
            lease_ms=lease_ms,
            send_ms=send_ms,
            clock=clock,
        )
        self._redis = context.redis
        self._prefix = prefix
        self.transitions: Counter[tuple[str, str]] = Counter()
        """Alerts recorded by (kind, status), for the metrics."""
        self._tick_cut = False
        """The last ``tick`` stopped at ``TICK_CALLS`` calls while more was due."""
        self._log = structlog.get_logger("worker.handlers.alerts")

    # --- what a subclass provides -------------------------------------------------------

    @abstractmethod
    def rules(self, thresholds: Thresholds) -> tuple[Rule, ...]:
        """The rules of this handler's alert kinds under one fleet's thresholds."""

    _collects_kinds: ClassVar[bool | None] = None
    """Whether ``handle`` calls ``collect_kinds`` (True) or ``collect`` (False): the one the
    class, or the nearest of its bases, defines (``collect_kinds`` if it defines both);
    None when neither is defined below ``AlertHandler``."""

    _crossing = False
    """Set while a default ``collect`` or ``collect_kinds`` calls the other: a class that
    overrides both, each calling its base's, does not loop."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for klass in cls.__mro__:
            if klass is AlertHandler:
                cls._collects_kinds = None
                break
            if "collect_kinds" in vars(klass) or "collect" in vars(klass):
                cls._collects_kinds = "collect_kinds" in vars(klass)
                break

    def collect(self, events: Sequence[ConnectionEvent], subjects: Subjects) -> None:
        """Add the batch's hits and clears to ``subjects``. A rule provides this or
        ``collect_kinds``; ``handle`` calls the one its class defines (or the nearest base
        does). This default hands the events to ``collect_kinds`` when the class has one of
        its own, so ``super().collect`` in a subclass of a rule that provides
        ``collect_kinds`` reaches it; otherwise, or when called back from the default
        ``collect_kinds``, it does nothing."""
        if type(self).collect_kinds is not AlertHandler.collect_kinds and not self._crossing:
            self._crossing = True
            try:
                self.collect_kinds(events, [event.kind for event in events], subjects)
            finally:
                self._crossing = False

    def collect_kinds(
        self,
        events: Sequence[ConnectionEvent],
        kinds: Sequence[EventKind],
        subjects: Subjects,
    ) -> None:
        """``collect``, told each event's kind (``kinds``, in the same order: ``Batch.kinds``),
        so that a rule interested in a few kinds skips the others without reading each event.
        This default hands the events to ``collect`` when the class has one of its own;
        otherwise, or when called back from the default ``collect``, it does nothing."""
        if type(self).collect is not AlertHandler.collect and not self._crossing:
            self._crossing = True
            try:
                self.collect(events, subjects)
            finally:
                self._crossing = False

    @abstractmethod
    def render(self, transition: Transition) -> Alert:
        """The alert a transition is announced as (a pure function of the transition)."""

    def sim_subject(
        self,
        subjects: Subjects,
        seen: dict[tuple[int, str], Subject],
        data: ConnectionData,
        index: int = 0,
    ) -> Subject:
        """The subject of the event's SIM under this handler's ``index``-th rule, looked up
        once a batch (``seen``, one per ``collect``). ``Subjects`` keys subjects by alert
        kind, so it is the subject the SIM's first event made whatever fleets later events
        name, as a lookup per event would give."""
        key = (index, data.sim_sid)
        found = seen.get(key)
        if found is None:
            rule = self.rules_for(data.fleet_sid)[index]
            found = seen[key] = subjects.get(rule, f"sim:{data.sim_sid}")
        return found

    def rules_for(self, fleet_sid: str | None) -> tuple[Rule, ...]:
        """This handler's rules for one fleet (cached; settings are frozen)."""
        found = self._rules.get(fleet_sid)
        if found is None:
            found = self._rules[fleet_sid] = self.rules(self.settings.for_fleet(fleet_sid))
        return found

    # --- the Handler protocol and extras -------------------------------------------------

    async def handle(self, batch: Batch) -> None:
        if not batch.events:
            return
        subjects = Subjects()
        if self._collects_kinds:
            self.collect_kinds(batch.events, batch.kinds, subjects)
        else:
            self.collect(batch.events, subjects)
        now_ms = round(self._clock() * 1000)
        # A shard's progress never passes the wall clock minus the upstream delay: events up
        # to that late may still come, on this shard as on any other (and a clock ahead of
        # ours does not move event time).
        latest = batch.latest
        if latest is None:  # a batch with events has a latest time
            raise ValueError("batch has events but no latest event time")
        newest = min(unix_ms(latest), now_ms - self._delay_ms)
        await self._apply(subjects, now_ms, shard=batch.shard_id, newest_ms=newest)

    async def tick(self, now: datetime | None = None) -> None:
        """Tell that every shard is caught up to event time ``now`` (default: the wall
        clock minus ``upstream_delay``, how late events may still reach the stream): walks
        and closes what event time has passed, and retries due deliveries.

        Call it only when the consumer is caught up on all shards (e.g. every few
        seconds while idle); during a backfill event time comes from the batches."""
        now_ms = round(self._clock() * 1000)
        tick_ms = now_ms - self._delay_ms if now is None else to_ms(now)
        self._tick_cut = False
        for _ in range(TICK_CALLS):
            if not await self._apply(Subjects(), now_ms, tick_ms=tick_ms):
                break
        else:  # every call took its limit: more may be due (a tick that raised is not cut)
            self._tick_cut = True

    async def flush(self) -> str | None:
        """Wait for the deliveries queued so far; then say what is left, if anything: the
        transitions the outbox still holds (a sink failed and they wait for a retry, or
        another replica of the group has them claimed), and subjects the last tick may have
        left to walk (each of its ``TICK_CALLS`` calls took its limit)."""
        await self.dispatcher.flush()
        said = []
        if self._tick_cut:
            said.append(
                f"the last tick stopped at its {TICK_CALLS} script calls, each of which took its "
                "limit: subjects may be left to walk or episodes to close, for a later tick of "
                "this consumer group"
            )
        left = await self.outbox.pending()
        if left:
            said.append(
                f"{left} alert transition(s) still in the outbox (deferred after a failed "
                "delivery, held while the dead store is full, or claimed by another replica): "
                "a later run of this consumer group delivers them"
            )
        return "; ".join(said) or None

    async def close(self) -> None:
        await self.dispatcher.close(grace=CLOSE_GRACE_S)
        for sink in self.sinks.values():
            await sink.close()

    async def open_episodes(self) -> dict[tuple[str, str], int]:
        """Open episodes by (alert kind, group), e.g. blocked SIMs per fleet."""
        raw = await self._redis.hkeys(f"{self._prefix}:active")  # type: ignore[misc]
        counts: Counter[tuple[str, str]] = Counter()
        for field in raw:
            text = field.decode() if isinstance(field, bytes) else field
            kind, group, _ = text.split("\t", 2)
            counts[(kind, group)] += 1
        return dict(counts)

    async def open_alerts(self) -> list[Alert]:
        """The episodes open now, each as its opening alert reads with what is known so
        far (count, last event), oldest first. Read-only: ``supersim-worker alerts list``."""
        raw = await self._redis.hkeys(f"{self._prefix}:active")  # type: ignore[misc]
        members = []
        for field in raw:
            kind, group, subject = _text(field).split("\t", 2)
            members.append((kind, group, subject))
        async with self._redis.pipeline(transaction=False) as pipe:
            for kind, _, subject in members:
                pipe.hgetall(f"{self._prefix}:s:{kind}:{subject}")
                pipe.hgetall(f"{self._prefix}:t:{kind}:{subject}")
            found = await pipe.execute()
        alerts = []
        for (kind, group, subject), state, tags in zip(
            members, found[::2], found[1::2], strict=True
        ):
            transition = _open_transition(kind, subject, group, _texts(state), _texts(tags))
            if transition is not None:
                alerts.append(self.render(transition))
        return sorted(alerts, key=lambda alert: (alert.opened_at, alert.id))

    async def gauges(self) -> list[Gauge]:
        """For the metrics: ``open_alerts`` per alert kind and group (a fleet, or
        ``all``: blocked SIMs per fleet are the open ``data_limit_reached`` ones), alerts
        recorded per kind and status, delivery rounds per sink and outcome, and the outbox's
        pending and dead entries."""
        readings = [
            Gauge("open_alerts", count, {"kind": kind, "group": group})
            for (kind, group), count in sorted((await self.open_episodes()).items())
        ]
        readings += [
            Gauge("alerts", count, {"kind": kind, "status": status}, counter=True)
            for (kind, status), count in sorted(self.transitions.items())
        ]
        readings += [
            Gauge(
                "alert_deliveries",
                count,
                {"handler": self.name, "sink": sink, "outcome": outcome},
                counter=True,
            )
            for (sink, outcome), count in sorted(self.dispatcher.deliveries.items())
        ]
        labels = {"handler": self.name}
        readings.append(Gauge("alert_outbox_pending", await self.outbox.pending(), labels))
        readings.append(Gauge("alert_outbox_dead", len(await self.outbox.dead()), labels))
        return readings

    async def _apply(
        self,
        subjects: Subjects,
        now_ms: int,
        *,
        shard: str = "",
        newest_ms: int = 0,
        tick_ms: int = 0,
    ) -> bool:
        """One script call; True if more subjects may be due than one call walks."""
        claimed: list[ClaimedEntry] = []
        limit = self.dispatcher.reserve()
        try:
            applied = await self.store.apply(
                subjects,
                now_ms=now_ms,
                shard=shard,
                newest_ms=newest_ms,
                tick_ms=tick_ms,
                claim=limit,
            )
            claimed = applied.claimed
        finally:
            self.dispatcher.release(claimed, limit)  # never hides the error being raised
        self.dispatcher.check()  # a failed delivery task surfaces here
        for transition in applied.transitions:
            self.transitions[(transition.kind, transition.status.value)] += 1
            if not transition.sent:
                self._record_unsent(transition)
        return applied.more

    def _record_unsent(self, transition: Transition) -> None:
        alert = self.render(transition)
        self._log.info(
            "alert_recorded_not_sent",
            reason="stale" if alert.status is AlertStatus.OPEN else "open alert was not sent",
            alert_id=alert.id,
            kind=alert.kind.value,
            status=alert.status.value,
            subject=alert.subject,
            first_seen=alert.first_seen.isoformat(),
            last_seen=alert.last_seen.isoformat(),
            count=alert.count,
        )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _texts(raw: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {_text(key): _text(value) for key, value in raw.items()}


def _open_transition(
    kind: str, subject: str, group: str, state: dict[str, str], tags: dict[str, str]
) -> Transition | None:
    """An open episode as the transition that opened it, from its state hash (``P:s:K:S``)
    and tags (``P:t:K:S``) as ``episodes.lua`` keeps them; None once it is no longer open
    (it closed between the two reads)."""
    if state.get("state") != "open" or "key" not in state:
        return None
    first = int(state["first"])
    if state.get("d") == "1":  # distinct members: tag -> newest time, counted once in it
        counts = {tag: 1 for tag, newest in tags.items() if int(newest) >= first}
    else:
        counts = {tag: int(count) for tag, count in tags.items()}
    meta, info = state.get("m") or "", state.get("info") or ""
    return Transition(
        kind=kind,
        subject=subject,
        group=state.get("g") or group,
        meta=orjson.loads(meta) if meta else {},
        key=int(state["key"]),
        status=AlertStatus.OPEN,
        at=int(state["at"]),
        opened=int(state["at"]),
        first=first,
        last=int(state["last"]),
        reason=None,
        count=int(state.get("n") or 0),
        tags=counts,
        info=orjson.loads(info) if info else {},
        sent=state.get("sent") == "1",
        created_ms=0,
    )
