"""The built-in ``attach_loops`` handler: devices that attach but never start a data session.

``attach_loop_accepts`` ``attachment.accepted`` events of one SIM within
``attach_loop_window`` of event time, with no ``data-session.started`` among them, open one
``attach_loop`` alert. Repeated accepted events in quick succession mean the device is
unable to use data and keeps restarting the attachment (Connection Events documentation);
the usual cause is a wrong APN. It resolves when a data session starts or when the SIM is
quiet for the window.

Redis state, delivery and exactly-once: see ``worker.handlers.alerts.episodes`` and
``worker.handlers.alerts.dispatch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from worker.events.records import ConnectionEvent, EventKind
from worker.events.times import unix_ms
from worker.handlers.alerts.episodes import Rule, Subject, Subjects, Transition
from worker.handlers.alerts.handler import AlertHandler, window_ms
from worker.handlers.alerts.model import Alert, AlertKind, AlertStatus, Severity
from worker.handlers.alerts.render import (
    build,
    clock,
    describe_window,
    network_tag,
    networks,
    sim_meta,
)
from worker.handlers.alerts.settings import AlertSettings, Thresholds
from worker.handlers.base import HandlerContext, Plugin

HINT: Final = (
    "The device attaches but cannot start a data session: check that its APN is `super` "
    "(and that roaming is enabled on the device)."
)


class AttachLoopsHandler(AlertHandler):
    name = "attach_loops"

    def rules(self, thresholds: Thresholds) -> tuple[Rule, ...]:
        return (
            Rule(
                AlertKind.ATTACH_LOOP,
                thresholds.attach_loop_accepts,
                window_ms(thresholds.attach_loop_window),
            ),
        )

    def collect_kinds(
        self,
        events: Sequence[ConnectionEvent],
        kinds: Sequence[EventKind],
        subjects: Subjects,
    ) -> None:
        seen: dict[tuple[int, str], Subject] = {}
        for kind, event in zip(kinds, events, strict=True):
            if (
                kind is not EventKind.ATTACHMENT_ACCEPTED
                and kind is not EventKind.DATA_SESSION_STARTED
            ):
                continue
            data = event.envelope.data
            subject = self.sim_subject(subjects, seen, data)
            if kind is EventKind.ATTACHMENT_ACCEPTED:
                if not subject.meta:
                    subject.meta, subject.group = sim_meta(data), data.fleet_sid or ""
                subject.hit(data.event_sid, unix_ms(data.timestamp), network_tag(data))
            else:
                subject.clears.append(unix_ms(data.timestamp))

    def render(self, transition: Transition) -> Alert:
        sim = transition.subject.removeprefix("sim:")
        window = describe_window(
            self.settings.for_fleet(transition.meta.get("fleet_sid")).attach_loop_window
        )
        resolved = transition.status is AlertStatus.RESOLVED
        return build(
            transition,
            kind=AlertKind.ATTACH_LOOP,
            severity=Severity.WARNING,
            title=f"Attach loop ended: SIM {sim}" if resolved else f"Attach loop: SIM {sim}",
            summary=(
                f"SIM {sim} attached {transition.count} times from {clock(transition.first)} "
                f"to {clock(transition.last)} without starting a data session."
            ),
            hint=HINT,
            resolution=(
                "a data session started"
                if transition.reason == "recovered"
                else f"quiet for {window}"
            ),
            details={"networks": networks(transition)},
        )


def create(context: HandlerContext[AlertSettings]) -> AttachLoopsHandler:
    return AttachLoopsHandler(context)


plugin: Final = Plugin(create, settings=AlertSettings, section="alerts", alerts=True)
"""The ``attach_loops`` handler, with the alert settings from ``SUPERSIM_ALERTS__*``."""
