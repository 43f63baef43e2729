"""In-process counters and gauges, logged periodically and summarised at exit."""

from __future__ import annotations

from collections import Counter


class Metrics:
    """A small registry of named counters and gauges (one per process, passed in)."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def incr(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value

    def snapshot(self) -> dict[str, float]:
        return {**self.counters, **self.gauges}
