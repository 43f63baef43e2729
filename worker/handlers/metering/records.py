"""How metering stores a data session in Redis: the packed record and its SIM-day hash.

``metering.lua`` writes this layout and :func:`read_sessions` reads it back. A SIM's
sessions that started on one UTC day share one hash, ``P:m:r:<sim_sid>:<YYYYMMDD>``:

- the session -> its packed record: ``RECORD_FIELDS`` joined by ``|``, empty trailing
  fields left out. A standard session sid (``PI`` and 32 lowercase hex digits) is the
  field byte 255 followed by its 16 bytes; any other sid is the field as it is (text is
  UTF-8, which never has byte 255). Numbers are base 36, ``-`` before a negative one, and
  an empty number is 0. Times are whole seconds: ``start`` after the day's UTC midnight,
  the others after the session's start.
- ``~f``, ``~a``, ``~o``, ``~l``, ``~i`` -> the hash's defaults: the first non-empty
  fleet, account, operator group, location group and IMEI written to it.
- ``~<code><n>`` -> a record's own value of a component that differs from the default
  (so records stay short when a SIM moves or roams), or (code ``c``) a coverage too long
  to keep in the record; ``~#`` -> how many such entries were handed out.

A record's component slot is empty for the hash's default, ``-`` for an empty value, or
the number ``n`` of its own entry. Redis keeps a hash as a listpack (compact) while its
fields and values are at most ``hash-max-listpack-value`` bytes (default 64) and it has at
most ``hash-max-listpack-entries`` fields (default 512). The layout relies on the first
(a record is 20 to 45 bytes, a shared value a sid, a location or an operator) and stays
far below the second (a SIM-day of a dozen sessions is about 20 fields). Past either
limit Redis stores the hash in a hashtable, which is larger, not wrong.

The previous layout, ``P:m:s:<sim_sid>:<YYYYMMDD>`` (``LEGACY_FIELDS``), is still read:
the script moves a record from it to the new hash when the session changes, and
:func:`read_sessions` lists the records that were not moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

RECORD_FIELDS: Final = (
    "start",  # session start, seconds after its UTC day's midnight
    "opri",  # priority of the event the operator group came from; odd once ended
    "cov",  # updated windows counted: "a:b,c:d"; a single "0:b" is written "b"
    "sd",  # bytes down of the updated windows counted
    "su",  # ... and up
    "ed",  # ended event: the session's cumulative bytes down (v2), or its window's (v1)
    "eu",  # ... and up
    "ev",  # "" when ed/eu are cumulative totals, "w" when they are the window's (v1)
    "end",  # session end (from the ended event), "" for the end of its window
    "fleet",  # component slots (COMPONENTS)
    "account",
    "op",
    "loc",
    "imei",
    "lpri",  # priority of the event the location came from, "" for opri
    "ipri",  # priority of the event the IMEI came from, "" for opri
)
"""Positions in a packed session record. A priority is twice the source event's window
end (relative), plus one for the ended event; so the session has seen its ended event
exactly when ``opri`` is odd, and ``(opri - 1) / 2`` is the end of the ended window."""

COMPONENTS: Final = ("fleet", "account", "op", "loc", "imei")
"""Record fields that usually repeat across a SIM's sessions (stored as slots)."""
COMPONENT_CODES: Final = ("f", "a", "o", "l", "i")
"""Their letters in the hash's field names (``~<code>``, ``~<code><n>``)."""
COUNT_FIELD: Final = "~#"
NONE_SLOT: Final = "-"
FIELD_LIMIT: Final = 64
"""Longest record kept whole, in bytes: Redis' default ``hash-max-listpack-value``. A
longer one (windows that arrived out of order leave gaps in ``cov``) keeps its ``cov`` in
an entry of its own, ``~c<n>``, and ``*<n>`` in its place."""
COVERAGE_CODE: Final = "c"
COVERAGE_REF: Final = "*"
RESERVED: Final = "~"
"""Fields of a session hash that start with it are not sessions."""
BINARY_SID: Final = b"\xff"
"""First byte of a session field holding a standard sid as bytes."""

OPERATOR_GROUP: Final = ("network", "rat", "mcc", "mnc", "operator", "country")
"""The ``op`` component: these joined by ``^``."""
LOCATION_GROUP: Final = ("cell", "lat", "lon")
"""The ``loc`` component: these joined by ``^``, empty if never reported."""

LEGACY_FIELDS: Final = (
    "start",  # session start, Unix seconds; the other times are seconds after it
    "end",
    "opri",
    "og",  # fleet^account^OPERATOR_GROUP
    "lpri",
    "loc",
    "ipri",
    "imei",
    "cov",
    "sd",
    "su",
    "eh",  # UTC hour "YYYYMMDDHH" of the ended window's end, "" until the ended event
    "ewd",  # the ended window's own bytes down and up
    "ewu",
    "cd",  # the session's cumulative bytes down and up, "" if v1
    "cu",
)
"""Positions in a record of the previous layout (``P:m:s:``)."""
LEGACY_DEFAULTED: Final = ("og", "loc", "imei")
"""Its ``~`` field: these values of the hash's first record; ``=`` in a record means
the default (``lpri``/``ipri``: equal to ``opri``)."""


@dataclass(frozen=True, slots=True)
class StoredSession:
    """One data session as metering recorded it."""

    sid: str
    start: int
    """Unix seconds."""
    end: int | None
    """Unix seconds, ``None`` until the ended event."""
    last_updated: int
    """Unix seconds: the window end of the latest event its descriptive fields came from."""
    fleet: str
    account: str
    operator: dict[str, str]
    """``OPERATOR_GROUP`` values."""
    location: dict[str, str]
    """``LOCATION_GROUP`` values, empty if never reported."""
    imei: str
    down: int
    up: int


def _groups(op: str, loc: str) -> tuple[dict[str, str], dict[str, str]]:
    operator = dict.fromkeys(OPERATOR_GROUP, "")
    operator.update(zip(OPERATOR_GROUP, op.split("^"), strict=False))
    location = dict(zip(LOCATION_GROUP, loc.split("^"), strict=False)) if loc else {}
    return operator, location


def _bytes(sd: int, su: int, ended: bool, ed: int, eu: int, cumulative: bool) -> tuple[int, int]:
    """(down, up): the updated windows plus the ended window's share (cumulative minus
    those windows with schema v2, else the ended window's bytes)."""
    if not ended:
        return sd, su
    if cumulative:
        return max(ed, sd), max(eu, su)
    return sd + ed, su + eu


def sid_of(field: bytes) -> str:
    """The session sid a session hash's field names."""
    if field[:1] == BINARY_SID and len(field) == 17:
        return "PI" + field[1:].hex()
    return field.decode()


def _number(text: str, default: int = 0) -> int:
    return int(text, 36) if text else default


def _record(sid: str, packed: str, stored: dict[str, str], day_start: int) -> StoredSession:
    parts = dict.fromkeys(RECORD_FIELDS, "")
    parts.update(zip(RECORD_FIELDS, packed.split("|"), strict=False))
    values = {}
    for name, code in zip(COMPONENTS, COMPONENT_CODES, strict=True):
        slot = parts[name]
        if slot == "":
            values[name] = stored.get(RESERVED + code, "")
        elif slot == NONE_SLOT:
            values[name] = ""
        else:
            values[name] = stored.get(RESERVED + code + slot, "")
    start = day_start + _number(parts["start"])
    opri = _number(parts["opri"])
    ended = opri % 2 == 1
    end = None
    if ended:
        end = start + _number(parts["end"], (opri - 1) // 2)
    priorities = [opri]
    if values["loc"]:
        priorities.append(_number(parts["lpri"], opri))
    if values["imei"]:
        priorities.append(_number(parts["ipri"], opri))
    down, up = _bytes(
        _number(parts["sd"]),
        _number(parts["su"]),
        ended,
        _number(parts["ed"]),
        _number(parts["eu"]),
        parts["ev"] == "",
    )
    operator, location = _groups(values["op"], values["loc"])
    return StoredSession(
        sid=sid,
        start=start,
        end=end,
        last_updated=start + max(priorities) // 2,
        fleet=values["fleet"],
        account=values["account"],
        operator=operator,
        location=location,
        imei=values["imei"],
        down=down,
        up=up,
    )


def _legacy_record(sid: str, packed: str, defaults: str) -> StoredSession:
    record = dict.fromkeys(LEGACY_FIELDS, "")
    record.update(zip(LEGACY_FIELDS, packed.split("|"), strict=False))
    default = dict(zip(LEGACY_DEFAULTED, defaults.split("|"), strict=False))
    for name in LEGACY_DEFAULTED:
        if record[name] == "=":
            record[name] = default.get(name, "")
    for name in ("lpri", "ipri"):
        if record[name] == "=":
            record[name] = record["opri"]
    fleet, account, op = ([*record["og"].split("^", 2), "", ""])[:3]
    start = int(record["start"] or 0)
    priorities = [int(record[name]) for name in ("opri", "lpri", "ipri") if record[name]]
    ended = record["eh"] != ""
    cumulative = record["cd"] != ""
    down, up = _bytes(
        int(record["sd"] or 0),
        int(record["su"] or 0),
        ended,
        int((record["cd"] if cumulative else record["ewd"]) or 0),
        int((record["cu"] if cumulative else record["ewu"]) or 0),
        cumulative,
    )
    operator, location = _groups(op, record["loc"])
    return StoredSession(
        sid=sid,
        start=start,
        end=start + int(record["end"]) if record["end"] else None,
        last_updated=start + max(priorities) // 2 if priorities else start,
        fleet=fleet,
        account=account,
        operator=operator,
        location=location,
        imei=record["imei"],
        down=down,
        up=up,
    )


def read_sessions(
    hash_fields: dict[bytes, bytes], legacy_fields: dict[bytes, bytes], day_start: int
) -> list[StoredSession]:
    """The sessions of one SIM-day: those of its hash (``hash_fields``, as HGETALL gives
    them), then those of its previous-layout hash (``legacy_fields``) that were not moved.
    ``day_start`` is the day's UTC midnight in Unix seconds."""
    stored = {sid_of(field): value.decode() for field, value in hash_fields.items()}
    legacy = {field.decode(): value.decode() for field, value in legacy_fields.items()}
    found = [
        _record(sid, packed, stored, day_start)
        for sid, packed in stored.items()
        if not sid.startswith(RESERVED)
    ]
    defaults = legacy.get(RESERVED, "")
    found += [
        _legacy_record(sid, packed, defaults)
        for sid, packed in legacy.items()
        if sid != RESERVED and sid not in stored
    ]
    return found
