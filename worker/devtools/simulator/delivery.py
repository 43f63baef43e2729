"""How the events reach the stream: envelopes, data forms, duplicates, order, test events.

Every delivery decision for an event is drawn in generation order from one dedicated
``Random``, for every generated event, *before* the subscription filter drops
``data-session.updated`` events. So an ``ended-only`` run writes exactly the records of the
matching ``updated+ended`` run minus the updated ones (and their duplicates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from random import Random

import orjson

from worker.devtools.simulator.catalog import (
    KINDS,
    KORE_PREFIX,
    KORE_SCHEMA,
    KORE_TEST_TYPE,
    TWILIO_PREFIX,
    TWILIO_SCHEMA,
    TWILIO_TEST_TYPE,
    UPDATED,
    iso_ms,
)
from worker.devtools.simulator.emitter import Event
from worker.devtools.simulator.options import SimulationOptions
from worker.devtools.simulator.world import World, rng_for


@dataclass(slots=True)
class DeliveryStats:
    """Counts of what was written, for the ground truth."""

    records: int = 0
    unique_events: int = 0
    duplicates_written: int = 0
    test_events: int = 0
    data_as_string: int = 0
    events_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    events_by_fleet: dict[str, dict[str, int]] = field(default_factory=dict)
    """Unique events per fleet sid and kind (kinds with none left out)."""
    envelopes: dict[str, int] = field(default_factory=lambda: {"kore": 0, "twilio": 0})

    def as_json(self) -> dict[str, object]:
        return {
            "records": self.records,
            "unique_events": self.unique_events,
            "duplicates_written": self.duplicates_written,
            "test_events": self.test_events,
            "events_by_kind": dict(self.events_by_kind),
            "events_by_fleet": {
                fleet: dict(sorted(kinds.items()))
                for fleet, kinds in sorted(self.events_by_fleet.items())
            },
            "records_by_envelope": dict(self.envelopes),
            "data_as_string": self.data_as_string,
        }


def subscribed(event: Event, options: SimulationOptions) -> bool:
    """Whether the stream's subscription carries this event's kind."""
    return options.subscription == "updated+ended" or event.kind != UPDATED


def envelope(event: Event, kore: bool, as_string: bool) -> bytes:
    """One record: the CloudEvent in structured JSON, Twilio's or KORE's envelope.

    Every envelope value is plain ASCII without quotes or backslashes, so the header is
    formatted directly; ``data`` goes through orjson.
    """
    data = event.data
    sid = data["event_sid"]
    if kore:
        kind, source, schema = KORE_PREFIX, "kore-events", KORE_SCHEMA
    else:
        kind, source, schema = TWILIO_PREFIX, "/v1/SuperSim/ConnectionEvents/" + sid, TWILIO_SCHEMA
    head = (
        f'{{"specversion":"1.0","type":"{kind}{event.kind}","source":"{source}","id":"{sid}",'
        f'"dataschema":"{schema}{event.sim.schema}","datacontenttype":"application/json",'
        f'"time":"{data["timestamp"][:-1]}.000Z","data":'
    ).encode()
    payload = orjson.dumps(data)
    if as_string:
        payload = orjson.dumps(payload.decode())
    return head + payload + b"}"


def test_event(ts: int, account_sid: str, test_id: str, kore: bool) -> bytes:
    """A sink test event: Twilio's carries ``data`` as a string, KORE's as an object."""
    if kore:
        data: object = {"test_id": test_id}
        kind = KORE_TEST_TYPE
    else:
        data = '{"test_id": "' + test_id + '"}'
        kind = TWILIO_TEST_TYPE
    return orjson.dumps(
        {
            "specversion": "1.0",
            "type": kind,
            "source": "Sink",
            "id": account_sid,
            "time": iso_ms(ts),
            "datacontenttype": "application/json",
            "data": data,
        }
    )


def deliver(
    events: list[Event], world: World, options: SimulationOptions
) -> tuple[list[bytes], DeliveryStats]:
    """The records in write order and what was written."""
    rng = rng_for(options, "delivery")
    window = options.shuffle_window
    mixed_vendors = 0.0 < options.kore_share < 1.0
    stats = DeliveryStats()
    keyed: list[tuple[float, int, int, bytes]] = []
    for event in events:
        duplicate = rng.random() < options.duplicate_share
        kore = rng.random() < options.kore_share
        as_string = rng.random() < options.data_as_string_share
        key = event.ts + rng.random() * window
        copy: tuple[bool, bool, float] | None = None
        if duplicate:
            other_vendor = mixed_vendors and rng.random() < 0.5
            copy = (
                kore != other_vendor,
                rng.random() < options.data_as_string_share,
                event.ts + rng.random() * window,
            )
        if not subscribed(event, options):
            continue
        stats.unique_events += 1
        stats.events_by_kind[event.kind] += 1
        by_kind = stats.events_by_fleet.setdefault(event.sim.fleet.sid, {})
        by_kind[event.kind] = by_kind.get(event.kind, 0) + 1
        for n, (k, s, order) in enumerate([(kore, as_string, key)] + ([copy] if copy else [])):
            keyed.append((order, event.seq, n, envelope(event, k, s)))
            stats.envelopes["kore" if k else "twilio"] += 1
            stats.data_as_string += s
        stats.duplicates_written += copy is not None
    _add_test_events(keyed, len(events), world, options, stats)
    keyed.sort(key=lambda item: item[:3])
    stats.records = len(keyed)
    return [item[3] for item in keyed], stats


def _add_test_events(
    keyed: list[tuple[float, int, int, bytes]],
    first_seq: int,
    world: World,
    options: SimulationOptions,
    stats: DeliveryStats,
) -> None:
    rng: Random = rng_for(options, "test-events")
    span = options.end_ts - options.start_ts
    for i in range(options.test_events):
        ts = options.start_ts + rng.randrange(span)
        account = world.accounts[rng.randrange(len(world.accounts))]
        test_id = f"{rng.getrandbits(128):032x}"
        test_id = "-".join(
            (test_id[:8], test_id[8:12], test_id[12:16], test_id[16:20], test_id[20:])
        )
        order = ts + rng.random() * options.shuffle_window
        keyed.append((order, first_seq + i, 0, test_event(ts, account, test_id, kore=i % 2 == 1)))
    stats.test_events = options.test_events
