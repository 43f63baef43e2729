"""Where alerts go: the sink Protocol, the structured-log sink and the Redis stream sink.

A sink's ``send`` reports how delivery went and never raises for delivery failures:
``delivered``; or not, with ``retriable`` saying whether a later round may succeed. The
webhook sink lives in ``worker.handlers.alerts.webhook``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import structlog

from worker.handlers.alerts.model import Alert, AlertStatus, Severity


@dataclass(frozen=True, slots=True)
class SendResult:
    delivered: bool
    retriable: bool = False
    reason: str = ""
    stream_fields: tuple[str, ...] = ()
    """Set by the stream sink: the outbox appends them when it settles the entry, in the
    same atomic step that removes it, so the stream gets each alert exactly once."""


DELIVERED = SendResult(delivered=True)


@runtime_checkable
class AlertSink(Protocol):
    """Delivers rendered alerts somewhere."""

    name: str
    remote: bool
    """True if sending waits on another system (settled as soon as it is sent, so a slow
    receiver never lets the claims of what it already accepted run out)."""

    async def send(self, alert: Alert) -> SendResult: ...

    async def close(self) -> None: ...


class LogSink:
    """One structured log line per alert: warnings (errors if critical) open, info resolved."""

    name = "log"
    remote = False

    def __init__(self) -> None:
        self._log = structlog.get_logger("worker.handlers.alerts")

    async def send(self, alert: Alert) -> SendResult:
        fields = alert.log_fields()
        if alert.status is AlertStatus.RESOLVED:
            self._log.info("alert_resolved", **fields)
        elif alert.severity is Severity.CRITICAL:
            self._log.error("alert_opened", **fields)
        else:
            self._log.warning("alert_opened", **fields)
        return DELIVERED

    async def close(self) -> None:
        return None


class StreamSink:
    """Appends alerts to a Redis stream for downstream consumers (via the outbox).

    Entry fields: ``id``, ``kind``, ``status``, ``severity``, ``subject``,
    ``delivery_key`` and ``alert`` (the alert as JSON).
    """

    name = "stream"
    remote = False

    async def send(self, alert: Alert) -> SendResult:
        fields = (
            "id",
            alert.id,
            "kind",
            alert.kind.value,
            "status",
            alert.status.value,
            "severity",
            alert.severity.value,
            "subject",
            alert.subject,
            "delivery_key",
            alert.delivery_key,
            "alert",
            alert.body().decode(),
        )
        return SendResult(delivered=True, stream_fields=fields)

    async def close(self) -> None:
        return None
