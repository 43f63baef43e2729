"""Helpers to turn a recorded transition into an ``Alert``: the fields every kind shares,
hit tags, and the event metadata handlers attach to subjects.

Tags are short strings stored with each hit: ``c:<code>:<message>`` for an error,
``n:<network key>:<network name>`` for a network. A network key is
``<iso country>-<mcc>-<mnc>``. None of them holds personal data.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson

from worker.events.records import ConnectionData
from worker.handlers.alerts.episodes import Transition
from worker.handlers.alerts.model import Alert, AlertKind, AlertStatus, Severity, from_ms

UNKNOWN_NETWORK = "unknown"


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


def network_key(data: ConnectionData) -> str:
    network = data.network
    if network is None or network.mcc is None or network.mnc is None:
        return UNKNOWN_NETWORK
    return f"{network.iso_country or ''}-{network.mcc}-{network.mnc}"


def network_tag(data: ConnectionData) -> str:
    name = data.network.friendly_name if data.network is not None else None
    return f"n:{network_key(data)}:{_clean(name or '')}"


def error_code(data: ConnectionData) -> int:
    return data.error.code if data.error is not None else 0


def error_tag(data: ConnectionData) -> str:
    error = data.error
    if error is None:
        return "c:0:"
    return f"c:{error.code}:{_clean(error.message or '')}"


def sim_meta(data: ConnectionData) -> str:
    """Subject metadata of a SIM: its account and fleet (no personal data)."""
    return orjson.dumps({"account_sid": data.account_sid, "fleet_sid": data.fleet_sid}).decode()


def network_meta(data: ConnectionData) -> str:
    """Subject metadata of a fleet's network."""
    network = data.network
    return orjson.dumps(
        {
            "account_sid": data.account_sid,
            "fleet_sid": data.fleet_sid,
            "network": {
                "key": network_key(data),
                "sid": network.sid if network else None,
                "name": network.friendly_name if network else None,
                "mcc": network.mcc if network else None,
                "mnc": network.mnc if network else None,
                "iso_country": network.iso_country if network else None,
            },
        }
    ).decode()


def codes(transition: Transition) -> list[dict[str, Any]]:
    """Counts by error code and message, most frequent first."""
    found = []
    for rest, count in transition.tag_counts("c:"):
        code, _, message = rest.partition(":")
        found.append(
            {"code": int(code) if code.isdigit() else 0, "message": message or None, "count": count}
        )
    return found


def networks(transition: Transition) -> list[dict[str, Any]]:
    """Networks tried, with counts, most frequent first."""
    found = []
    for rest, count in transition.tag_counts("n:"):
        key, _, name = rest.partition(":")
        found.append({"network": key, "name": name or None, "count": count})
    return found


def describe_window(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def clock(ms: int) -> str:
    return from_ms(ms).strftime("%Y-%m-%d %H:%M:%SZ")


def build(
    transition: Transition,
    *,
    kind: AlertKind,
    severity: Severity,
    title: str,
    summary: str,
    hint: str,
    resolution: str | None,
    details: dict[str, Any],
) -> Alert:
    """An alert with the fields every kind fills the same way from the transition."""
    meta = transition.meta
    subject = transition.subject
    return Alert(
        id=transition.id,
        kind=kind,
        status=transition.status,
        severity=severity,
        subject=subject,
        title=title,
        summary=summary,
        hint=hint,
        account_sid=meta.get("account_sid"),
        fleet_sid=meta.get("fleet_sid") or transition.group or None,
        sim_sid=subject[4:] if subject.startswith("sim:") else None,
        opened_at=from_ms(transition.opened),
        resolved_at=from_ms(transition.at) if transition.status is AlertStatus.RESOLVED else None,
        resolution=resolution if transition.status is AlertStatus.RESOLVED else None,
        first_seen=from_ms(transition.first),
        last_seen=from_ms(transition.last),
        count=transition.count,
        details=details,
    )
