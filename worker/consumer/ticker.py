"""Periodic calls into handlers while the consumer is idle: ``tick`` and gauges.

Handlers with event-time windows (the alert handlers) close episodes that went quiet only
when event time moves on. While events flow, the batches move it; once every shard is
caught up nothing arrives, so the ticker calls the optional ``tick()`` of each handler
every ``interval`` seconds, and only then. It also reads the optional gauges
(``open_episodes()``) into the metrics. One task, owned by the ``Ticker`` context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

from worker.handlers.base import Handler
from worker.metrics import Metrics
from worker.owned_task import OwnedTask

GAUGE_EVERY = 12
"""Read the gauges every this many ticks."""


class Ticker(OwnedTask):
    name = "ticker"

    def __init__(
        self,
        handlers: Sequence[Handler],
        caught_up: Callable[[], Awaitable[bool]],
        metrics: Metrics,
        interval: float,
    ) -> None:
        self._tickers = [h for h in handlers if callable(getattr(h, "tick", None))]
        self._gauges = [h for h in handlers if callable(getattr(h, "open_episodes", None))]
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
            for handler in self._tickers:
                await self._call(handler, "tick")
        if rounds % GAUGE_EVERY == 1:
            for handler in self._gauges:
                found = await self._call(handler, "open_episodes")
                for (kind, group), count in (found or {}).items():
                    self._metrics.gauge(f"open_alerts:{kind}:{group}", count)

    async def _call(self, handler: Handler, method: str) -> Any:
        try:
            return await getattr(handler, method)()
        except Exception as exc:  # a failing tick must not stop the consumer; logged, retried
            self._log.warning(
                "handler_periodic_call_failed",
                handler=handler.name,
                method=method,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None
