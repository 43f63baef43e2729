"""Where alerts go: the sink Protocol, the sink registry, the structured-log sink and the
Redis stream sink.

A sink's ``send`` reports how delivery went and never raises for delivery failures:
``delivered``; or not, with ``retriable`` saying whether a later round may succeed. The
webhook sink lives in ``worker.handlers.alerts.webhook``.

Sinks are chosen by name in ``SUPERSIM_ALERTS__SINKS``: the built-ins, then those that
packages register under the ``supersim_worker.alert_sinks`` entry-point group, each a
factory taking the ``AlertSettings`` and returning an ``AlertSink``::

    [project.entry-points."supersim_worker.alert_sinks"]
    pager = "my_package.pager:create"
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import structlog

from worker.handlers.alerts.model import Alert, AlertStatus, Severity

if TYPE_CHECKING:
    from worker.handlers.alerts.settings import AlertSettings

SINK_ENTRY_POINT_GROUP: Final = "supersim_worker.alert_sinks"
BUILTIN_SINKS: Final = {
    "log": "worker.handlers.alerts.sinks:log_sink",
    "stream": "worker.handlers.alerts.sinks:stream_sink",
    "webhook": "worker.handlers.alerts.webhook:webhook_sink",
}


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


SinkFactory = Callable[["AlertSettings"], AlertSink]


def available_sinks() -> dict[str, str]:
    """Sink name → import target: the built-ins first, then the entry points."""
    found = dict(BUILTIN_SINKS)
    for point in entry_points(group=SINK_ENTRY_POINT_GROUP):
        found.setdefault(point.name, point.value)
    return found


def load_sink(name: str) -> SinkFactory:
    """A sink factory by name (names are checked when the settings are read)."""
    module_name, _, attr = available_sinks()[name].partition(":")
    factory: SinkFactory = getattr(importlib.import_module(module_name), attr)
    return factory


def log_sink(_: AlertSettings) -> LogSink:
    return LogSink()


def stream_sink(_: AlertSettings) -> StreamSink:
    return StreamSink()
