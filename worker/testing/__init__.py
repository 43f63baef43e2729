"""A test kit for handler authors: build events, run a handler against a real Redis,
check that it is idempotent, and test it on a simulated fleet with its ground truth.

- ``worker.testing.events``: connection events of every kind in both envelopes (Twilio,
  KORE), as dicts, record bytes or decoded ``ConnectionEvent``s (``make_event``,
  ``make_record``, ``make_connection_event``, ``twin``); ``worker.testing.samples``: the
  reference data they start from.
- ``worker.testing.runner``: ``HandlerRunner`` builds a handler from its ``Plugin`` (or
  name) and settings, and feeds it batches with the hooks called as the consumer calls them.
- ``worker.testing.idempotency``: ``assert_idempotent``.
- ``worker.testing.state``: snapshots of the Redis keys under a prefix, and their diff.
- ``worker.testing.fleet``: ``simulate_fleet`` (records and truth).
- ``worker.testing.pytest_plugin``: the fixtures ``supersim_redis_url``, ``supersim_fleet``
  and ``supersim_simulate``, loaded by pytest automatically.

See docs/handlers.md ("Testing a handler").
"""

from __future__ import annotations

from worker.testing.events import (
    as_connection_event,
    in_other_envelope,
    make_connection_event,
    make_event,
    make_record,
    twin,
)
from worker.testing.fleet import SimulatedFleet, simulate_fleet
from worker.testing.idempotency import assert_idempotent
from worker.testing.runner import HandlerRunner, resolve
from worker.testing.samples import KINDS, VENDORS
from worker.testing.state import KeyState, State, diff, snapshot

__all__ = [
    "KINDS",
    "VENDORS",
    "HandlerRunner",
    "KeyState",
    "SimulatedFleet",
    "State",
    "as_connection_event",
    "assert_idempotent",
    "diff",
    "in_other_envelope",
    "make_connection_event",
    "make_event",
    "make_record",
    "resolve",
    "simulate_fleet",
    "snapshot",
    "twin",
]
