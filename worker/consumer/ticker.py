"""Periodic calls into handlers while the consumer is idle: ``tick`` and gauges.

Handlers with event-time windows (the alert handlers) close episodes that went quiet only
when event time moves on. While events flow, the batches move it; once every shard is
caught up nothing arrives, so the ticker calls ``tick()`` of each handler that ``Ticks``
every ``interval`` seconds, and only then. It also reads the gauges of each handler that
``HasGauges`` into the metrics. One task, owned by the ``Ticker`` context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import structlog

from worker.handlers.base import Handler, HasGauges, Ticks
from worker.metrics import Metrics
from worker.owned_task import OwnedTask

T = TypeVar("T")

GAUGE_EVERY = 5
"""Read the gauges every this many rounds."""


class Ticker(OwnedTask):
    name = "ticker"

    def __init__(
        self,
        handlers: Sequence[Handler],
        caught_up: Callable[[], Awaitable[bool]],
        metrics: Metrics,
        interval: float,
    ) -> None:
        self._tickers = [h for h in handlers if isinstance(h, Ticks)]
        self._gauges = [h for h in handlers if isinstance(h, HasGauges)]
        super().__init__(enabled=bool(self._tickers or self._gauges))
        self._caught_up = caught_up
        self._metrics = metrics
        self._interval = interval
        self._log = structlog.get_logger("worker.consumer.ticker")

    async def _run(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self._interval)
            rounds += 1
            try:
                await self._round(rounds)
            except Exception as exc:  # e.g. Redis unreachable: log, try again next round
                self._log.warning("ticker_round_failed", error=f"{type(exc).__name__}: {exc}")

    async def _round(self, rounds: int) -> None:
        if await self._caught_up():
            for ticking in self._tickers:
                await self._call(ticking, ticking.tick)
        if rounds % GAUGE_EVERY == 1:
            await self.read_gauges()

    async def read_gauges(self) -> None:
        """Read every handler's gauges into the metrics (summed over handlers per name and
        label set)."""
        series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        counters: set[str] = set()
        for measured in self._gauges:
            for gauge in await self._call(measured, measured.gauges) or ():
                key = tuple(sorted(gauge.labels.items()))
                found = series.setdefault(gauge.name, {})
                found[key] = found.get(key, 0.0) + gauge.value
                if gauge.counter:
                    counters.add(gauge.name)
                name = ":".join((gauge.name, *gauge.labels.values()))
                self._metrics.gauge(name, gauge.value)
        self._metrics.readings(
            {
                name: (
                    name in counters,
                    [(dict(labels), value) for labels, value in values.items()],
                )
                for name, values in series.items()
            }
        )

    async def _call(self, handler: object, method: Callable[[], Awaitable[T]]) -> T | None:
        try:
            return await method()
        except Exception as exc:  # a failing tick must not stop the consumer; logged, retried
            self._log.warning(
                "handler_periodic_call_failed",
                handler=getattr(handler, "name", type(handler).__name__),
                method=method.__name__,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None
