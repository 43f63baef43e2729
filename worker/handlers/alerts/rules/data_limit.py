"""The built-in ``data_limit`` handler: SIMs blocked at their data limit.

In event-time order per SIM, the first event with ``data_modifier: blocked`` opens one
``data_limit_reached`` alert (SIM, fleet, the session's usage so far, time); later blocked
events of the same episode only extend it; the first later event without
``data_modifier`` resolves it ("unblocked"). ``blocked_sims()`` is the gauge of currently
blocked SIMs per fleet (shared by all replicas).

Redis state, delivery and exactly-once: see ``worker.handlers.alerts.episodes`` and
``worker.handlers.alerts.dispatch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import orjson

from worker.events.records import ConnectionData, ConnectionEvent
from worker.events.times import unix_ms
from worker.handlers.alerts.episodes import Rule, Subject, Subjects, Transition
from worker.handlers.alerts.handler import AlertHandler
from worker.handlers.alerts.model import Alert, AlertKind, AlertStatus, Severity
from worker.handlers.alerts.render import build, clock, sim_meta
from worker.handlers.alerts.settings import AlertSettings, Thresholds
from worker.handlers.base import HandlerContext, Plugin

BLOCKED: Final = "blocked"
HINT: Final = (
    "The SIM has used its data limit and cannot use data until the limit resets or is "
    "raised: check the data limit of its Fleet and what the device is sending."
)


def usage_info(event: ConnectionEvent) -> str:
    """What the blocked event says about the session's usage so far (bytes; None if unknown)."""
    data: ConnectionData = event.data
    info: dict[str, Any] = {"event_type": event.kind.value}
    if data.data_session_sid is not None:
        info["data_session_sid"] = data.data_session_sid
        info["session_download"] = data.data_session_data_download
        info["session_upload"] = data.data_session_data_upload
        info["session_total"] = data.data_session_data_total
    return orjson.dumps(info).decode()


class DataLimitHandler(AlertHandler):
    name = "data_limit"

    def rules(self, thresholds: Thresholds) -> tuple[Rule, ...]:
        return (Rule(AlertKind.DATA_LIMIT_REACHED, threshold=1, window_ms=0, quiet=False),)

    def collect(self, events: Sequence[ConnectionEvent], subjects: Subjects) -> None:
        seen: dict[tuple[int, str], Subject] = {}
        for event in events:  # every event is a hit or a clear of its SIM
            data = event.envelope.data
            subject = self.sim_subject(subjects, seen, data)
            modifier = data.data_modifier
            if modifier is None:
                subject.clears.append(unix_ms(data.timestamp))
            elif modifier == BLOCKED:
                if not subject.meta:
                    subject.meta, subject.group = sim_meta(data), data.fleet_sid or ""
                subject.hit(data.event_sid, unix_ms(data.timestamp), "", usage_info(event))

    def render(self, transition: Transition) -> Alert:
        sim = transition.subject.removeprefix("sim:")
        info = dict(transition.info)
        total = info.get("session_total")
        usage = f"; its data session had used {total} bytes" if total is not None else ""
        resolved = transition.status is AlertStatus.RESOLVED
        if resolved:
            summary = (
                f"SIM {sim} was blocked at its data limit from {clock(transition.first)} "
                f"and is unblocked since {clock(transition.at)}."
            )
        else:
            summary = f"SIM {sim} reached its data limit at {clock(transition.first)}{usage}."
        return build(
            transition,
            kind=AlertKind.DATA_LIMIT_REACHED,
            severity=Severity.WARNING,
            title=f"SIM {sim} unblocked" if resolved else f"Data limit reached: SIM {sim}",
            summary=summary,
            hint=HINT,
            resolution="unblocked",
            details={"usage_at_block": info, "blocked_events": transition.count},
        )

    async def blocked_sims(self) -> dict[str, int]:
        """Gauge: fleet SID -> SIMs currently blocked at their data limit."""
        found = await self.open_episodes()
        return {
            fleet: count
            for (kind, fleet), count in found.items()
            if kind == AlertKind.DATA_LIMIT_REACHED
        }


def create(context: HandlerContext[AlertSettings]) -> DataLimitHandler:
    return DataLimitHandler(context)


plugin: Final = Plugin(create, settings=AlertSettings, section="alerts", alerts=True)
"""The ``data_limit`` handler, with the alert settings from ``SUPERSIM_ALERTS__*``."""
