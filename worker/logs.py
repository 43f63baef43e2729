"""structlog set-up, done once at start-up: JSON lines in production, console on a terminal.

Context (``shard_id``, ``sequence_number``) is bound per shard and per record with
contextvars. Personal data in events (IMSI, IMEI, ICCID, IP address, location) is
replaced by ``REDACTED`` unless redaction is turned off in the settings, wherever it sits
in a logged value (nested dicts and lists, decoded events and their models). Free-text
fields that carry exception messages (``error``, ``exception``) and strings inside logged
containers may quote values a handler saw, so runs of 14 to 20 digits (IMSI, IMEI,
ICCID), IP addresses, latitude and longitude pairs and the values of personal data fields
quoted with their names (``lac='15170'``, ``lat=34.1``) in them are replaced too.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import orjson
import structlog
from pydantic import BaseModel

REDACTED: Final = "[redacted]"
PII_KEYS: Final = frozenset(
    {"imsi", "imei", "iccid", "sim_iccid", "ip_address", "location", "lat", "lon", "cell_id", "lac"}
)

FREE_TEXT_KEYS: Final = frozenset({"error", "exception"})
PII_TEXT: Final = re.compile(
    r"(?<![0-9A-Za-z])(?<![0-9]\.)[0-9]{14,20}(?!\.?[0-9A-Za-z])"  # IMSI, IMEI, ICCID
    r"|(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?!\.?[0-9])"  # IPv4
    r"|(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){3,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])"  # IPv6
    r"|(?<![0-9A-Za-z:])[0-9A-Fa-f]{1,4}::[0-9A-Fa-f]{1,4}(?![0-9A-Za-z:])"  # IPv6, short
    r"|(?<![0-9A-Za-z.:])-?[0-9]{1,3}\.[0-9]{4,} ?, ?-?[0-9]{1,3}\.[0-9]{4,}(?![0-9])"  # lat, lon
)
"""Personal data as it appears inside a message: identifiers are digit runs of their own
(a 56-digit Kinesis sequence number, a hex SID or a number's decimals are left alone), addresses dotted or
colon-separated with three colons or more (a time of day has two) or with ``::``, and
a latitude and longitude pair (``34.166991, -118.5720773``; a lone number is not one)."""
PII_FIELD_TEXT: Final = re.compile(
    r"(?i)(?<![0-9A-Za-z_])(imsi|imei|iccid|sim_iccid|ip_address|cell_id|lac|lat|lon)"
    r"""(['"]?\s*[:=]\s*['"]?)([^'",\s)}\]]+)"""
)
"""A personal data field quoted in a message with its value, ``lac='15170'``,
``"cell_id": "47322374"`` or ``imsi=732...``: the value goes whatever it looks like."""

_MAX_DEPTH: Final = 8
"""Containers nested deeper than this are replaced whole by the marker."""
_CONTAINERS: Final = (dict, list, tuple, BaseModel)


def redact_pii(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace personal data by a marker, at any depth of dicts, lists and tuples.

    Pydantic models (a decoded event's ``data``) and dataclasses (a ``ConnectionEvent``) are
    turned into dicts first: rendered as they are, their repr would show every field. Values
    are replaced by redacted copies; the caller's objects are never changed. None stays None.
    """
    for key, value in event_dict.items():
        if key in PII_KEYS:
            if value is not None:
                event_dict[key] = REDACTED
        elif key in FREE_TEXT_KEYS:
            event_dict[key] = _scrubbed(value, _MAX_DEPTH)
        elif isinstance(value, _CONTAINERS) or _is_dataclass_instance(value):
            event_dict[key] = _redacted(value, _MAX_DEPTH)
    return event_dict


def scrub_text(text: str) -> str:
    """``text`` with the personal data a message may quote replaced by the marker."""
    return PII_TEXT.sub(REDACTED, PII_FIELD_TEXT.sub(rf"\1\2{REDACTED}", text))


def _scrubbed(value: Any, depth: int) -> Any:
    """A free-text value (or a rendered traceback: dicts and lists of them) with personal
    data in its strings replaced."""
    if isinstance(value, str):
        return scrub_text(value)
    if depth <= 0:
        return value if value is None or isinstance(value, int | float | bool) else REDACTED
    if isinstance(value, dict):
        return {k: _scrubbed(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrubbed(v, depth - 1) for v in value]
    return value


def _is_dataclass_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _redacted(value: Any, depth: int) -> Any:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif _is_dataclass_instance(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        if depth <= 0:
            return REDACTED
        return {
            k: (REDACTED if v is not None else None) if k in PII_KEYS else _redacted(v, depth - 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        if depth <= 0:
            return REDACTED
        return [_redacted(v, depth - 1) for v in value]
    if isinstance(value, str):  # e.g. an upstream error message inside an alert's details
        return scrub_text(value)
    return value


def configure(fmt: str = "auto", level: str = "INFO", redact: bool = True) -> None:
    """Configure structlog for the process. ``fmt`` is auto, json or console."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks are rendered into the ``exception`` field before redaction, so their
        # messages are redacted too; they never show local variables (records, events).
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        if as_json
        else structlog.processors.format_exc_info,
    ]
    if redact:
        processors.append(redact_pii)
    if as_json:
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors.append(
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        )
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
