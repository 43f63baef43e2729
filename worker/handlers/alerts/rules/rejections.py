"""The built-in ``rejections`` handler: rejection storms and failure bursts.

Alert kinds (thresholds and windows are settings, per fleet if wanted):

- ``rejection_storm``: one SIM has ``storm_rejections`` ``attachment.rejected`` events
  within ``storm_window`` of event time. Details: counts by error code and message,
  networks tried, first/last seen and a hint from the codes. It ends when the SIM attaches
  (``attachment.accepted`` or ``data-session.started``) or is quiet for the window.
- ``fleet_network_rejections``: ``fleet_sims`` distinct SIMs of one fleet rejected on the
  same network within ``fleet_window``: likely a Network Access Profile change or a network
  outage. Codes about the SIM's own state (``fleet_ignore_codes``: new, inactive) do not
  count. It ends when the network is quiet for the window.
- ``attachment_failure_burst`` / ``data_session_failure_burst``: the same per-SIM rule for
  ``attachment.failed`` and ``data-session.failed``; they end with a successful attachment
  or data session (respectively), or when quiet.

Redis state, delivery and exactly-once: see ``worker.handlers.alerts.episodes`` and
``worker.handlers.alerts.dispatch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Final

from worker.events.records import ConnectionData, ConnectionEvent, EventKind
from worker.events.times import unix_ms
from worker.handlers.alerts.episodes import Rule, Subject, Subjects, Transition
from worker.handlers.alerts.handler import AlertHandler, window_ms
from worker.handlers.alerts.model import Alert, AlertKind, AlertStatus, Severity
from worker.handlers.alerts.render import (
    build,
    clock,
    codes,
    describe_window,
    error_code,
    error_tag,
    network_key,
    network_meta,
    network_tag,
    networks,
    sim_meta,
)
from worker.handlers.alerts.settings import AlertSettings, Thresholds
from worker.handlers.base import HandlerContext, Plugin

HINTS: Final = {
    83700: "Attachments fail with an internal error. This is usually transient; if it lasts, "
    "contact support with the SIM SID and times.",
    83701: "Data sessions fail to start with an internal error. This is usually transient; "
    "check that the device uses the APN `super`, and contact support if it lasts.",
    83702: "The Fleet's Network Access Profile does not allow the network(s) tried (or the IMSI "
    "is blocked there): allow the network in the NAP, or let the device choose another one.",
    83703: "The device re-attaches too often and is rate limited: lengthen its reconnect back-off.",
    83704: "The SIM is in the `new` state and cannot connect until activated: set its status "
    "to `active`.",
    83705: "The SIM is `inactive`, which blocks it from every network: set its status to "
    "`active` if it should connect.",
}
GENERIC_HINT: Final = "Check the SIM's status, the Fleet's Network Access Profile and the device."
FLEET_HINT: Final = (
    "Many SIMs of this fleet are rejected on the same network: check that the Fleet's Network "
    "Access Profile allows it (was it changed recently?), or whether the network has an outage."
)
_RELEVANT: Final = frozenset(
    {
        EventKind.ATTACHMENT_REJECTED,
        EventKind.ATTACHMENT_FAILED,
        EventKind.DATA_SESSION_FAILED,
        EventKind.ATTACHMENT_ACCEPTED,
        EventKind.DATA_SESSION_STARTED,
    }
)
_STORM, _FLEET, _ATTACH, _SESSION = range(4)
"""Positions of the rules in ``RejectionsHandler.rules``."""
_HIT_RULE: Final = {
    EventKind.ATTACHMENT_REJECTED: _STORM,
    EventKind.ATTACHMENT_FAILED: _ATTACH,
    EventKind.DATA_SESSION_FAILED: _SESSION,
}
_PER_SIM: Final = {
    AlertKind.REJECTION_STORM: ("Rejection storm", "attachment rejections"),
    AlertKind.ATTACHMENT_FAILURE_BURST: ("Attachment failure burst", "failed attachments"),
    AlertKind.DATA_SESSION_FAILURE_BURST: ("Data session failure burst", "failed data sessions"),
}


def hint_for(found_codes: Sequence[int]) -> str:
    """Hints for the codes seen, most frequent first."""
    hints = [HINTS[code] for code in dict.fromkeys(found_codes) if code in HINTS]
    return " ".join(hints) or GENERIC_HINT


class RejectionsHandler(AlertHandler):
    name = "rejections"

    def rules(self, thresholds: Thresholds) -> tuple[Rule, ...]:
        t = thresholds
        return (
            Rule(AlertKind.REJECTION_STORM, t.storm_rejections, window_ms(t.storm_window)),
            Rule(
                AlertKind.FLEET_NETWORK_REJECTIONS,
                t.fleet_sims,
                window_ms(t.fleet_window),
                distinct=True,
            ),
            Rule(
                AlertKind.ATTACHMENT_FAILURE_BURST,
                t.attachment_failures,
                window_ms(t.failure_window),
            ),
            Rule(
                AlertKind.DATA_SESSION_FAILURE_BURST,
                t.data_session_failures,
                window_ms(t.failure_window),
            ),
        )

    def collect_kinds(
        self,
        events: Sequence[ConnectionEvent],
        kinds: Sequence[EventKind],
        subjects: Subjects,
    ) -> None:
        ignored = self.settings.fleet_ignore_codes
        seen: dict[tuple[int, str], Subject] = {}
        sim_subject = partial(self.sim_subject, subjects, seen)
        for kind, event in zip(kinds, events, strict=True):
            if kind not in _RELEVANT:
                continue
            data = event.envelope.data
            ts = unix_ms(data.timestamp)
            if kind is EventKind.ATTACHMENT_ACCEPTED:
                sim_subject(data, _STORM).clears.append(ts)
                sim_subject(data, _ATTACH).clears.append(ts)
            elif kind is EventKind.DATA_SESSION_STARTED:
                sim_subject(data, _STORM).clears.append(ts)
                sim_subject(data, _ATTACH).clears.append(ts)
                sim_subject(data, _SESSION).clears.append(ts)
            else:
                _sim_hit(sim_subject(data, _HIT_RULE[kind]), data, ts)
                if kind is EventKind.ATTACHMENT_REJECTED and data.fleet_sid:
                    code = error_code(data)
                    if code not in ignored:
                        fleet = self.rules_for(data.fleet_sid)[_FLEET]
                        subject = f"fleet:{data.fleet_sid}/network:{network_key(data)}"
                        target = subjects.get(fleet, subject)
                        if not target.meta:
                            target.meta, target.group = network_meta(data), data.fleet_sid
                        target.hit(data.sim_sid, ts, f"c:{code}:")

    def render(self, transition: Transition) -> Alert:
        kind = AlertKind(transition.kind)
        if kind is AlertKind.FLEET_NETWORK_REJECTIONS:
            return self._render_fleet(transition)
        return self._render_sim(kind, transition)

    def _window(self, kind: AlertKind, fleet_sid: str | None) -> str:
        t = self.settings.for_fleet(fleet_sid)
        window = {
            AlertKind.REJECTION_STORM: t.storm_window,
            AlertKind.FLEET_NETWORK_REJECTIONS: t.fleet_window,
        }.get(kind, t.failure_window)
        return describe_window(window)

    def _render_sim(self, kind: AlertKind, transition: Transition) -> Alert:
        title, what = _PER_SIM[kind]
        sim = transition.subject.removeprefix("sim:")
        found_codes, found_networks = codes(transition), networks(transition)
        window = self._window(kind, transition.meta.get("fleet_sid"))
        code_text = ", ".join(f"{c['code']} ({c['count']})" for c in found_codes)
        summary = (
            f"SIM {sim}: {transition.count} {what} from {clock(transition.first)} to "
            f"{clock(transition.last)} on {len(found_networks)} network(s); codes {code_text}."
        )
        resolved = transition.status is AlertStatus.RESOLVED
        if kind is AlertKind.DATA_SESSION_FAILURE_BURST:
            recovered = "a data session started"
        else:
            recovered = "the SIM attached successfully"
        resolution = recovered if transition.reason == "recovered" else f"quiet for {window}"
        return build(
            transition,
            kind=kind,
            severity=Severity.WARNING,
            title=f"{title} ended: SIM {sim}" if resolved else f"{title}: SIM {sim}",
            summary=summary,
            hint=hint_for([c["code"] for c in found_codes]),
            resolution=resolution,
            details={"codes": found_codes, "networks": found_networks},
        )

    def _render_fleet(self, transition: Transition) -> Alert:
        network = dict(transition.meta.get("network") or {})
        fleet_sid = transition.meta.get("fleet_sid")
        name = network.get("name") or network.get("key") or "unknown network"
        window = self._window(AlertKind.FLEET_NETWORK_REJECTIONS, fleet_sid)
        found_codes = [{"code": c["code"]} for c in codes(transition)]
        summary = (
            f"{transition.count} SIMs of fleet {fleet_sid} rejected on {name} "
            f"({network.get('key')}) from {clock(transition.first)} to {clock(transition.last)}."
        )
        resolved = transition.status is AlertStatus.RESOLVED
        title = f"Fleet {fleet_sid}: SIMs rejected on {name}"
        return build(
            transition,
            kind=AlertKind.FLEET_NETWORK_REJECTIONS,
            severity=Severity.CRITICAL,
            title=f"{title} (ended)" if resolved else title,
            summary=summary,
            hint=FLEET_HINT,
            resolution=f"no rejections on the network for {window}",
            details={"network": network, "distinct_sims": transition.count, "codes": found_codes},
        )


def _sim_hit(subject: Subject, data: ConnectionData, ts: int) -> None:
    if not subject.meta:
        subject.meta, subject.group = sim_meta(data), data.fleet_sid or ""
    tags = f"{error_tag(data)}\t{network_tag(data)}"
    subject.hit(data.event_sid, ts, tags)


def create(context: HandlerContext[AlertSettings]) -> RejectionsHandler:
    return RejectionsHandler(context)


plugin: Final = Plugin(create, settings=AlertSettings, section="alerts", alerts=True)
"""The ``rejections`` handler, with the alert settings from ``SUPERSIM_ALERTS__*``."""
