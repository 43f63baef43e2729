"""The worker's metrics: Prometheus metrics (served on ``/metrics``) and a summary logged at
exit.

One ``Metrics`` per process, built at start-up and passed in; each holds its own Prometheus
registry (so tests can build several). Every metric name starts with ``supersim_``. Labels
are bounded: shard, handler, kind, sink, outcome and reason, never a SIM; the readings
handlers report through their gauges (``HasGauges``) are capped at ``MAX_SERIES`` label
sets per name.

``incr``/``gauge`` keep the in-process summary that ``worker_stopped`` logs.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.version import package_version

MAX_SERIES = 200
"""Most label sets one handler reading may export (e.g. blocked SIMs for 200 fleets)."""


class _Readings(Collector):
    """The latest readings handlers reported (``supersim_<name>``), as gauges or counters."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[bool, dict[tuple[tuple[str, str], ...], float]]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, (counter, series) in sorted(self.latest.items()):
            labels = sorted({key for labelset in series for key, _ in labelset})
            family: GaugeMetricFamily | CounterMetricFamily
            if counter:
                family = CounterMetricFamily(
                    f"supersim_{name}", f"Handler reading {name}.", labels=labels
                )
            else:
                family = GaugeMetricFamily(
                    f"supersim_{name}", f"Handler reading {name}.", labels=labels
                )
            for labelset, value in series.items():
                values = dict(labelset)
                family.add_metric([values.get(key, "") for key in labels], value)
            yield family


class Metrics:
    """The worker's Prometheus metrics and its exit summary."""

    def __init__(self) -> None:
        self.counters: Tally[str] = Tally()
        self.gauges: dict[str, float] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_read = Counter(
            "supersim_records_read", "Records read from Kinesis.", ["shard"], registry=r
        )
        self.events_handled = Counter(
            "supersim_events_handled",
            "Connection events every handler handled.",
            ["shard"],
            registry=r,
        )
        self.records_skipped = Counter(
            "supersim_records_skipped",
            "Records not for the handlers (sink test events, other CloudEvents).",
            ["reason"],
            registry=r,
        )
        self.records_dead_lettered = Counter(
            "supersim_records_dead_lettered",
            "Records written to the dead-letter store, by the handler that failed on them "
            "(decode for decode failures).",
            ["handler"],
            registry=r,
        )
        self.decode_errors = Counter(
            "supersim_decode_errors", "Records that did not decode.", ["reason"], registry=r
        )
        self.handler_duration = Histogram(
            "supersim_handler_duration_seconds",
            "Time one handler call took (a batch, or part of one while bisecting).",
            ["handler"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.handler_failures = Counter(
            "supersim_handler_failures", "Handler calls that raised.", ["handler"], registry=r
        )
        self.handler_timeouts = Counter(
            "supersim_handler_timeouts",
            "Handler calls cut off by SUPERSIM_HANDLER_TIMEOUT.",
            ["handler"],
            registry=r,
        )
        self.handler_outages = Counter(
            "supersim_handler_outages",
            "Batches kept back because a handler was unavailable (retried later).",
            ["handler"],
            registry=r,
        )
        self.get_records = Counter(
            "supersim_get_records_calls", "GetRecords calls.", ["shard"], registry=r
        )
        self.get_records_throttled = Counter(
            "supersim_get_records_throttles",
            "GetRecords calls throttled (ProvisionedThroughputExceeded, LimitExceeded).",
            ["shard"],
            registry=r,
        )
        self.get_records_retries = Counter(
            "supersim_get_records_retries", "GetRecords calls retried.", ["shard"], registry=r
        )
        self.iterators_expired = Counter(
            "supersim_iterators_expired", "Shard iterators that expired.", ["shard"], registry=r
        )
        self.millis_behind = Gauge(
            "supersim_shard_millis_behind_latest",
            "MillisBehindLatest of the shard's last GetRecords.",
            ["shard"],
            registry=r,
        )
        self.iterator_age = Gauge(
            "supersim_shard_iterator_age_seconds",
            "Age of the newest record handled on the shard (its arrival in Kinesis).",
            ["shard"],
            registry=r,
        )
        self.checkpoint_writes = Counter(
            "supersim_checkpoint_writes", "Checkpoints written.", ["shard"], registry=r
        )
        self.leases_held = Gauge("supersim_leases_held", "Shard leases held.", registry=r)
        self.leases_taken = Counter("supersim_leases_taken", "Shard leases taken.", registry=r)
        self.leases_stolen = Counter(
            "supersim_leases_steal_requests",
            "Steal requests this replica made to balance the shards.",
            registry=r,
        )
        self.leases_handed_over = Counter(
            "supersim_leases_handed_over",
            "Leases handed over to another replica that asked.",
            registry=r,
        )
        self.leases_lost = Counter(
            "supersim_leases_lost", "Leases found lost (expired and taken).", registry=r
        )
        self.fencing_refusals = Counter(
            "supersim_fencing_refusals",
            "Checkpoint writes refused because the lease had moved on.",
            registry=r,
        )
        self.dead_letter_length = Gauge(
            "supersim_dead_letter_length", "Entries in the dead-letter store.", registry=r
        )
        self.build_info = Gauge(
            "supersim_build_info", "The running version.", ["version"], registry=r
        )
        self.build_info.labels(version=package_version()).set(1)
        self.started = Gauge(
            "supersim_start_time_seconds", "When this worker started (Unix time).", registry=r
        )
        self.started.set(time.time())
        self._readings = _Readings()
        r.register(self._readings)

    # --- the exit summary ------------------------------------------------------------------

    def incr(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict[str, float]:
        return {**self.counters, **self.gauges}

    # --- handler readings ------------------------------------------------------------------

    def readings(
        self, found: Mapping[str, tuple[bool, Sequence[tuple[Mapping[str, str], float]]]]
    ) -> None:
        """Replace every handler reading: name -> (is a counter, its series). Names not
        reported this time disappear; each keeps at most ``MAX_SERIES`` series, largest
        first."""
        latest = {}
        for name, (counter, series) in found.items():
            ranked = sorted(series, key=lambda item: -item[1])[:MAX_SERIES]
            latest[name] = (counter, {tuple(sorted(k.items())): v for k, v in ranked})
        self._readings.latest = latest
