"""structlog set-up, done once at start-up: JSON lines in production, console on a terminal.

Context (``shard_id``, ``sequence_number``) is bound per shard and per record with
contextvars. Personal data in events (IMSI, IMEI, ICCID, IP address, location) is
replaced by ``REDACTED`` unless redaction is turned off in the settings, wherever it sits
in a logged value (nested dicts and lists, decoded events and their models). Free-text
fields that carry exception messages (``error``, ``exception``) and strings inside logged
containers may quote values a handler saw, so runs of 14 to 20 digits (IMSI, IMEI,
ICCID), IP addresses, latitude and longitude pairs and the values of personal data fields
quoted with their names (``lac='15170'``, ``lat=34.1``) in them are replaced too.

**One stream.** Records of the standard library's ``logging`` (botocore, aiohttp, redis,
asyncio, ``warnings``) go through the same processors by ``structlog.stdlib.
ProcessorFormatter``: the same JSON (or console) lines on standard error, the same
redaction, their message scrubbed like an ``error`` field, with the ``logger`` that wrote
them. Every line carries the ``version`` of the package, and once the worker knows them
(``bind_process``) its ``stream``, ``consumer_group`` and ``replica``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Any, Final, TextIO

import orjson
import structlog
from pydantic import BaseModel

from worker.version import package_version

REDACTED: Final = "[redacted]"
PII_KEYS: Final = frozenset(
    {"imsi", "imei", "iccid", "sim_iccid", "ip_address", "location", "lat", "lon", "cell_id", "lac"}
)

FREE_TEXT_KEYS: Final = frozenset({"error", "exception"})
PII_TEXT: Final = (
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
PII_FIELD_TEXT: Final = (
    r"(?i)(?<![0-9A-Za-z_])(imsi|imei|iccid|sim_iccid|ip_address|cell_id|lac|lat|lon)"
    r"""(['"]?\s*[:=]\s*['"]?)([^'",\s)}\]]+)"""
)
"""A personal data field quoted in a message with its value, ``lac='15170'``,
``"cell_id": "47322374"`` or ``imsi=732...``: the value goes whatever it looks like."""

KINESIS_DATA: Final = r"""(['"]Data['"]\s*:\s*['"])[A-Za-z0-9+/=]{16,}"""
"""A Kinesis record's payload in a library's debug dump of a request or response
(botocore at DEBUG logs bodies): base64 of the event, personal data included."""
SESSION_TOKEN: Final = r"""(?i)(x-amz-security-token['"]?\s*[:=]\s*b?['"]?)[A-Za-z0-9+/=%_-]{16,}"""
"""Temporary AWS credentials' session token in botocore's debug dump of a signed request
(a role's credentials): a secret, whatever the redaction setting says about personal data."""

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


@functools.cache
def _compiled(source: str) -> re.Pattern[str]:
    """The scrubbers' patterns, compiled on first use: a command that logs nothing (``dlq
    list``, ``usage``) does not pay for compiling them at start-up."""
    return re.compile(source)


def scrub_text(text: str) -> str:
    """``text`` with the personal data a message may quote replaced by the marker."""
    return _compiled(PII_TEXT).sub(
        REDACTED, _compiled(PII_FIELD_TEXT).sub(rf"\1\2{REDACTED}", text)
    )


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


def scrub_foreign(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A standard library record's free text (its message, a stack) scrubbed like an
    ``error`` field, Kinesis record payloads in dumped bodies included."""
    for key in ("event", "stack_info"):
        value = event_dict.get(key)
        if isinstance(value, str):
            event_dict[key] = scrub_text(_compiled(KINESIS_DATA).sub(rf"\1{REDACTED}", value))
    return event_dict


def hide_session_tokens(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A standard library record's message with AWS session tokens replaced (always on)."""
    value = event_dict.get("event")
    if isinstance(value, str) and "ecurity" in value:
        event_dict["event"] = _compiled(SESSION_TOKEN).sub(rf"\1{REDACTED}", value)
    return event_dict


class ProcessFields:
    """A processor adding what identifies the process (version, stream, consumer group,
    replica) to every line, without overriding a field the event sets itself."""

    def __init__(self, **fields: str) -> None:
        self.fields = dict(fields)

    def __call__(
        self, _: Any, __: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in self.fields.items():
            event_dict.setdefault(key, value)
        return event_dict


def configure(fmt: str = "auto", level: str = "INFO", redact: bool = True) -> None:
    """Configure structlog, and the standard library's logging through it, for the process.

    ``fmt`` is auto, json or console. Our own lines go straight to standard error (no
    ``logging`` on the way); library records reach the same processors through a root
    handler. In JSON, uncaught exceptions are logged (``uncaught_exception``) rather than
    printed as a bare traceback. Calling it again replaces the previous set-up."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    process = ProcessFields(version=package_version())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        process,
    ]
    tail: list[Any] = [
        # Tracebacks are rendered into the ``exception`` field before redaction, so their
        # messages are redacted too; they never show local variables (records, events).
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        if as_json
        else structlog.processors.format_exc_info,
    ]
    if redact:
        tail.append(redact_pii)
    if as_json:
        renderer: Any = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        text_renderer: Any = structlog.processors.JSONRenderer(serializer=_dumps_text)
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        renderer = text_renderer = structlog.dev.ConsoleRenderer(
            exception_formatter=structlog.dev.plain_traceback
        )
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    foreign = [
        structlog.stdlib.add_logger_name,
        hide_session_tokens,
        *([scrub_foreign] if redact else []),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, *foreign],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            text_renderer,
        ],
    )
    _route_stdlib(StderrHandler(formatter, binary=as_json), level, as_json)


def _dumps_text(value: Any, **kwargs: Any) -> str:
    """orjson for ``ProcessorFormatter``, which must return text."""
    return orjson.dumps(value, **kwargs).decode()


def renders_json() -> bool:
    """Whether ``configure`` set up JSON lines (False before it ran, or after a reset)."""
    if not structlog.is_configured():
        return False
    processors = structlog.get_config()["processors"]
    return bool(processors) and isinstance(processors[-1], structlog.processors.JSONRenderer)


def bind_process(*, stream: str, group: str, replica: str, version: str | None = None) -> None:
    """Add the stream, consumer group, replica id (the lease owner) and version to every
    later line of the process, ours and the libraries'. Call it once the worker knows
    them, after ``configure``. When structlog was set up elsewhere (an application
    embedding the worker, tests), they are bound as context variables instead: every
    line logged in the calling task and the tasks it starts then carries them."""
    fields = {"stream": stream, "consumer_group": group, "replica": replica}
    if version is not None:
        fields["version"] = version
    found = [p for p in structlog.get_config()["processors"] if isinstance(p, ProcessFields)]
    if found:
        for processor in found:
            processor.fields.update(fields)
    else:
        structlog.contextvars.bind_contextvars(**fields)


class StderrHandler(logging.Handler):
    """Writes formatted records to the process's standard error as it is when each record
    is written (one line each; bytes to its buffer for JSON, like our own lines), and
    remembers what it replaced so that ``reset`` can put it back."""

    def __init__(self, formatter: logging.Formatter, *, binary: bool) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self.binary = binary
        self.replaced_level = logging.NOTSET
        self.replaced_excepthook: Callable[..., Any] = sys.excepthook

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            stream: TextIO = sys.stderr
            if self.binary:
                stream.buffer.write(line.encode())
            else:
                stream.write(line)
            stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _route_stdlib(handler: StderrHandler, level: str, as_json: bool) -> None:
    """Make ``handler`` the root logger's only handler of ours, at ``level``; route
    ``warnings`` through logging; in JSON, log uncaught exceptions."""
    reset()
    root = logging.getLogger()
    handler.replaced_level = root.level
    handler.replaced_excepthook = sys.excepthook
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if as_json:
        sys.excepthook = _log_uncaught


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    structlog.get_logger("worker").critical("uncaught_exception", exc_info=(kind, error, traceback))


def reset() -> None:
    """Undo what ``configure`` did to the standard library's logging, ``warnings`` and
    the exception hook (tests; structlog itself is reset by ``structlog.reset_defaults``)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
        root.setLevel(handler.replaced_level)
        if sys.excepthook is _log_uncaught:
            sys.excepthook = handler.replaced_excepthook
        logging.captureWarnings(False)
        handler.close()
