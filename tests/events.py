"""Test data: Super SIM connection events in exactly the format they arrive in on the stream.

The builders ship with the package as ``worker.testing.events`` (the handler authors' test
kit), their reference data as ``worker.testing.samples``; the project's own tests import
them from here. See ``worker.testing.events`` for the shorthands and overrides.
"""

from __future__ import annotations

from worker.testing.events import (
    all_kinds,
    event_sid,
    event_type,
    make_connection_event,
    make_data,
    make_event,
    make_other_event,
    make_record,
    make_sink_test_event,
    to_jsonl,
    to_record,
)
from worker.testing.samples import (
    CUMULATIVE_FIELDS,
    ERRORS,
    KINDS,
    LOCATION,
    NETWORK,
    SESSION,
    SIM,
    TWILIO_PREFIX,
    USAGE_KINDS,
    VENDORS,
)

__all__ = [
    "CUMULATIVE_FIELDS",
    "ERRORS",
    "KINDS",
    "LOCATION",
    "NETWORK",
    "SESSION",
    "SIM",
    "TWILIO_PREFIX",
    "USAGE_KINDS",
    "VENDORS",
    "all_kinds",
    "event_sid",
    "event_type",
    "make_connection_event",
    "make_data",
    "make_event",
    "make_other_event",
    "make_record",
    "make_sink_test_event",
    "to_jsonl",
    "to_record",
]
