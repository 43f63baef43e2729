"""Periodic calls into handlers while the consumer is idle: ``tick`` and gauges.

Handlers with event-time windows (the alert handlers) close episodes that went quiet only
when event time moves on. While events flow, the batches move it; once every shard is
caught up nothing arrives, so the ticker calls ``tick()`` of each handler that ``Ticks``
every ``interval`` seconds, and only then (a run that ends caught up, ``run
--until-caught-up``, ticks once more as it exits and flushes the handlers that
``Flushes``: ``last_tick``). It also reads the gauges of each handler that
``HasGauges`` into the metrics, every ``GAUGE_EVERY`` rounds, whether or not the shards are
caught up (and whether or not that could be told).

Each call is bounded by ``timeout`` (``SUPERSIM_HANDLER_TIMEOUT``). A call that fails or
times out is logged (``handler_periodic_call_failed``) and counted in
``supersim_handler_failures_total{handler}``; it never stops the ticker, and never costs
the other handlers their readings: a handler whose ``gauges()`` failed keeps its last
readings (none if it never answered) until it answers again. A call cut off at its timeout
that ignores its cancellation for ``ABANDON_GRACE`` is left to end on its own (kept until
it does): the ticker goes on, skipping that handler's calls while it runs. One task, owned
by the ``Ticker`` context.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog

from worker.handlers.base import Flushes, Gauge, Handler, HasGauges, Ticks
from worker.metrics import Metrics
from worker.owned_task import OwnedTask

T = TypeVar("T")

GAUGE_EVERY = 5
"""Read the gauges every this many rounds."""
ABANDON_GRACE = 1.0
"""Seconds a call cut off at its timeout is given to end once cancelled."""


class _Failed:
    """What a periodic call that failed returns instead of its value."""


_FAILED = _Failed()


class Ticker(OwnedTask):
    name = "ticker"

    def __init__(
        self,
        handlers: Sequence[Handler],
        caught_up: Callable[[], Awaitable[bool]],
        metrics: Metrics,
        interval: float,
        timeout: float = 60.0,
    ) -> None:
        self._tickers = [h for h in handlers if isinstance(h, Ticks)]
        self._gauges = [h for h in handlers if isinstance(h, HasGauges)]
        self._flushers = [h for h in handlers if isinstance(h, Flushes)]
        super().__init__(enabled=bool(self._tickers or self._gauges))
        self._caught_up = caught_up
        self._metrics = metrics
        self._interval = interval
        self._timeout = timeout
        self._last: dict[int, Sequence[Gauge]] = {}
        """Per handler (its index in ``_gauges``): the readings it last reported."""
        self._strays: dict[int, asyncio.Future[Any]] = {}
        """Per handler (``id``): its call cut off and abandoned, until it ends."""
        self._log = structlog.get_logger("worker.consumer.ticker")

    @property
    def last(self) -> list[str]:
        """The names of the handlers ``last_tick`` calls (ticks or flushes)."""
        return list(dict.fromkeys(h.name for h in [*self._tickers, *self._flushers]))

    async def _run(self) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(self._interval)
            rounds += 1
            await self._round(rounds)

    async def _round(self, rounds: int) -> None:
        try:
            caught_up = await self._caught_up()
        except Exception as exc:  # e.g. Redis unreachable: no ticks this round, gauges still
            self._log.warning("ticker_round_failed", error=f"{type(exc).__name__}: {exc}")
            caught_up = False
        if caught_up:
            await self.tick()
        if rounds % GAUGE_EVERY == 1:
            await self.read_gauges()

    async def tick(self) -> None:
        """Call ``tick()`` of every handler that ``Ticks``, one after another, each bounded
        as the rounds' calls are. Only while every shard is caught up."""
        for ticking in self._tickers:
            await self._call(ticking, ticking.tick)

    async def last_tick(self) -> dict[str, str]:
        """As a run that ended caught up exits, with the ticker's own task stopped: tick
        every handler that ``Ticks`` once more (after giving a call abandoned when the task
        stopped ``ABANDON_GRACE`` to end, so that it does not make its handler skip this
        one), then ``flush()`` every handler that ``Flushes``. The handlers' calls run
        concurrently, each bounded by the timeout: the ticks, then the flushes, take one
        timeout each at most. Returns, by handler name, what is left undone: a tick or
        flush that failed (logged and counted as the rounds' calls are), or what its flush
        says it left."""
        if not self._tickers and not self._flushers:
            return {}
        if self._strays:  # their done callbacks, added first, drop them as they end
            await asyncio.wait(list(self._strays.values()), timeout=ABANDON_GRACE)
        self._log.info(
            "last_tick",
            ticks=[h.name for h in self._tickers],
            flushes=[h.name for h in self._flushers],
        )
        ticked = await asyncio.gather(*(self._call(h, h.tick) for h in self._tickers))
        flushed = await asyncio.gather(*(self._call(h, h.flush) for h in self._flushers))
        left: dict[str, list[str]] = {}
        for handler, result in zip(self._tickers, ticked, strict=True):
            if isinstance(result, _Failed):
                left.setdefault(handler.name, []).append("its last tick failed")
        for flusher, said in zip(self._flushers, flushed, strict=True):
            if isinstance(said, _Failed):
                left.setdefault(flusher.name, []).append("its flush failed")
            elif isinstance(said, str) and said:  # anything else says nothing
                left.setdefault(flusher.name, []).append(said)
        return {name: "; ".join(reasons) for name, reasons in left.items()}

    async def read_gauges(self) -> None:
        """Read every handler's gauges into the metrics (summed over handlers per name and
        label set); a handler whose call fails counts with its last readings."""
        series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        counters: set[str] = set()
        for index, measured in enumerate(self._gauges):
            found = await self._call(measured, measured.gauges)
            if isinstance(found, _Failed):
                readings = self._last.get(index, ())
            else:
                readings = self._last[index] = list(found)
            for gauge in readings:
                key = tuple(sorted(gauge.labels.items()))
                named = series.setdefault(gauge.name, {})
                named[key] = named.get(key, 0.0) + gauge.value
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

    async def _call(self, handler: Handler, method: Callable[[], Awaitable[T]]) -> T | _Failed:
        """``method()`` within the timeout, or ``_FAILED`` (logged and counted) if it
        raised, timed out or raised ``CancelledError`` without this task being cancelled,
        or if the handler's call abandoned earlier still runs."""
        if id(handler) in self._strays:
            return self._failed(handler, method, "its call abandoned earlier still runs")
        try:
            call: asyncio.Future[T] = asyncio.ensure_future(method())
        except Exception as exc:  # not even a call to wait for
            return self._failed(handler, method, f"{type(exc).__name__}: {exc}")
        try:
            await asyncio.wait({call}, timeout=self._timeout)
        except asyncio.CancelledError:  # the ticker itself is stopping
            call.cancel()
            self._keep_stray(handler, call)
            raise
        if not call.done():
            call.cancel()
            await asyncio.wait({call}, timeout=ABANDON_GRACE)
            self._keep_stray(handler, call)
            return self._failed(
                handler,
                method,
                f"took longer than {self._timeout:g} s (SUPERSIM_HANDLER_TIMEOUT)",
                abandoned=not call.done(),
            )
        if call.cancelled():
            return self._failed(handler, method, "CancelledError: the call raised it")
        if (error := call.exception()) is not None:
            return self._failed(handler, method, f"{type(error).__name__}: {error}")
        return call.result()

    def _failed(
        self, handler: Handler, method: Callable[[], object], error: str, *, abandoned: bool = False
    ) -> _Failed:
        self._metrics.handler_failures.labels(handler=handler.name).inc()
        self._log.warning(
            "handler_periodic_call_failed",
            handler=handler.name,
            method=getattr(method, "__name__", repr(method)),
            error=error,
            **({"abandoned": True} if abandoned else {}),
        )
        return _FAILED

    def _keep_stray(self, handler: Handler, call: asyncio.Future[Any]) -> None:
        """Keep a call that has not ended until it does, then collect its outcome."""
        if call.done():
            if not call.cancelled():
                call.exception()
            return
        self._strays[id(handler)] = call

        def collect(ended: asyncio.Future[Any]) -> None:
            if self._strays.get(id(handler)) is ended:
                del self._strays[id(handler)]
            if not ended.cancelled():
                ended.exception()

        call.add_done_callback(collect)
