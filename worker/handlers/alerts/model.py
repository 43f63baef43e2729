"""The alert: one model for every kind, with an id that is the same for the same episode.

An *episode* is one stretch of trouble of one subject (a SIM, or a fleet's network) in
event time. It produces at most two alerts: ``open`` when it is detected and ``resolved``
when it ends. Both carry the episode's id, derived from the alert kind, the subject and
the episode's first event time only, so any replica, retry or replay that sees the same
episode names it the same way; ``delivery_key`` (id and status) is what receivers
de-duplicate on.

Alerts never carry personal data: no IMSI, IMEI, ICCID, IP address or location.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict

from worker.events.times import unix_ms


class AlertKind(StrEnum):
    REJECTION_STORM = "rejection_storm"
    FLEET_NETWORK_REJECTIONS = "fleet_network_rejections"
    ATTACHMENT_FAILURE_BURST = "attachment_failure_burst"
    DATA_SESSION_FAILURE_BURST = "data_session_failure_burst"
    DATA_LIMIT_REACHED = "data_limit_reached"
    ATTACH_LOOP = "attach_loop"


class AlertStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


def alert_id(kind: str, subject: str, episode_start_ms: int) -> str:
    """The id of one episode: kind, subject and first event time, hashed."""
    digest = hashlib.sha256(f"{kind}|{subject}|{episode_start_ms}".encode()).hexdigest()
    return f"{kind}-{digest[:24]}"


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


to_ms = unix_ms
"""A datetime in Unix milliseconds (``round(moment.timestamp() * 1000)``)."""


class Alert(BaseModel):
    """One alert message: an episode opening or resolving."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    """Same for the open and resolved alerts of one episode, on every replica and retry."""
    kind: AlertKind
    status: AlertStatus
    severity: Severity
    subject: str
    """What the episode is about: ``sim:<sim_sid>`` or ``fleet:<fleet_sid>/network:<key>``."""
    title: str
    summary: str
    hint: str
    account_sid: str | None = None
    fleet_sid: str | None = None
    sim_sid: str | None = None
    opened_at: AwareDatetime
    """Event time at which the episode met its threshold."""
    resolved_at: AwareDatetime | None = None
    """Event time at which it ended (resolved alerts only)."""
    resolution: str | None = None
    """Why it ended: ``recovered`` (for example a successful attachment) or ``quiet``."""
    first_seen: AwareDatetime
    last_seen: AwareDatetime
    """The episode's event-time range as known when this alert was made."""
    count: int
    """Events (or distinct SIMs, for fleet alerts) in the episode so far."""
    details: dict[str, Any]

    @property
    def delivery_key(self) -> str:
        """What a receiver de-duplicates on: one open and one resolved alert per episode."""
        return f"{self.id}:{self.status.value}"

    def body(self) -> bytes:
        """The alert as compact JSON (the webhook body and the stream entry)."""
        return self.model_dump_json().encode()

    def log_fields(self) -> dict[str, Any]:
        """Flat fields for a structured log line."""
        fields = self.model_dump(mode="json")
        fields["alert_id"] = fields.pop("id")
        return fields
