"""structlog set-up, done once at start-up: JSON lines in production, console on a terminal.

Context (``shard_id``, ``sequence_number``) is bound per shard and per record with
contextvars. Personal data in events (IMSI, IMEI, ICCID, IP address, location) is
replaced by ``REDACTED`` unless redaction is turned off in the settings.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import orjson
import structlog

REDACTED: Final = "[redacted]"
PII_KEYS: Final = frozenset(
    {"imsi", "imei", "iccid", "sim_iccid", "ip_address", "location", "lat", "lon", "cell_id", "lac"}
)


def redact_pii(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace personal data, at the top level and one level down, by a marker."""
    for key, value in event_dict.items():
        if key in PII_KEYS and value is not None:
            event_dict[key] = REDACTED
        elif isinstance(value, dict) and not PII_KEYS.isdisjoint(value):
            event_dict[key] = {k: (REDACTED if k in PII_KEYS else v) for k, v in value.items()}
    return event_dict


def configure(fmt: str = "auto", level: str = "INFO", redact: bool = True) -> None:
    """Configure structlog for the process. ``fmt`` is auto, json or console."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if redact:
        processors.append(redact_pii)
    if as_json:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors.append(structlog.dev.ConsoleRenderer())
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
