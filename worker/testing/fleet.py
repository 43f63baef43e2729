"""The simulator's fleet for tests: a reproducible stream of records with its exact truth.

``simulate_fleet()`` runs ``worker.devtools.simulator`` (the ``supersim-worker simulate``
engine) with small defaults that still hold what handlers must cope with: duplicates, some
in the other vendor's envelope, records out of order, ``data`` as a string, sink test
events. Any ``SimulationOptions`` field can be overridden. The truth (``truth``) is the
simulator's ground truth: usage per SIM, fleet, account, network, hour and day, sessions,
the episodes alerts should find, and the unique events per kind (``events_by_kind``) and
per fleet and kind (``events_by_fleet``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from worker.devtools.simulator import SimulationOptions, generate, truth_path
from worker.devtools.simulator.core import dump_truth
from worker.events.records import ConnectionEvent
from worker.testing.events import connection_event_of

DEFAULT_FLEET: Final[Mapping[str, Any]] = {
    "sims": 30,
    "hours": 2.0,
    "seed": 7,
    "fleets": 3,
    "duplicate_share": 0.1,
    "kore_share": 0.3,
    "shuffle_window": 60,
    "data_as_string_share": 0.1,
    "test_events": 2,
}
"""30 SIMs in 3 fleets for 2 hours: about 1,500 records."""


@dataclass(frozen=True, slots=True)
class SimulatedFleet:
    """A simulated stream: its records in stream order and its ground truth."""

    options: SimulationOptions
    records: tuple[bytes, ...]
    truth: Mapping[str, Any]

    def events(self) -> list[ConnectionEvent]:
        """The records decoded, connection events only (sink test events left out)."""
        return [event for event in map(connection_event_of, self.records) if event is not None]

    def write(self, path: Path) -> Path:
        """Write the records as JSON Lines to ``path`` (what ``supersim-worker replay``
        reads) and the truth beside it (``<stem>.truth.json``); returns ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(record + b"\n" for record in self.records))
        truth_path(path).write_bytes(dump_truth(dict(self.truth)))
        return path


def simulate_fleet(**options: Any) -> SimulatedFleet:
    """A simulated fleet: ``DEFAULT_FLEET`` with ``options`` (``SimulationOptions`` fields)
    over it. The same options always give the same records and truth."""
    chosen = SimulationOptions(**{**DEFAULT_FLEET, **options})
    records, truth = generate(chosen)
    return SimulatedFleet(chosen, tuple(records), truth)
