"""Backfill progress reporting and the idle ticker."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from worker.consumer.progress import ProgressReporter
from worker.consumer.shard_reader import ShardProgress
from worker.consumer.ticker import Ticker
from worker.handlers.base import Batch, Gauge
from worker.metrics import Metrics


def shards() -> dict[str, ShardProgress]:
    return {
        "shardId-0": ShardProgress("shardId-0", records_read=1200, millis_behind=3_600_000),
        "shardId-1": ShardProgress("shardId-1", records_read=40, caught_up=True),
        "shardId-2": ShardProgress("shardId-2", records_read=7, ended=True),
    }


def test_progress_is_a_log_line_per_report_off_a_terminal() -> None:
    """Without a terminal, progress is one structured log line with every shard's figures."""
    reporter = ProgressReporter(shards(), tty=False, enabled=True)
    with capture_logs() as logs:
        reporter.report()
    assert logs[0]["event"] == "progress"
    assert logs[0]["shards"]["shardId-0"] == {
        "records": 1200,
        "millis_behind": 3_600_000,
        "caught_up": False,
        "ended": False,
    }


def test_progress_on_a_terminal_shows_a_line_per_shard(capsys: pytest.CaptureFixture[str]) -> None:
    """On a terminal, each shard gets a line: records, rate and how far behind it is."""
    reporter = ProgressReporter(shards(), tty=True, enabled=True)
    reporter.report()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert "shardId-0" in lines[0]
    assert "1200 records" in lines[0]
    assert "60 min behind" in lines[0]
    assert "at tip" in lines[1]
    assert "ended" in lines[2]


class Ticking:
    name = "ticking"

    def __init__(self) -> None:
        self.ticks = 0

    async def handle(self, batch: Batch) -> None:
        return None

    async def close(self) -> None:
        return None

    async def tick(self) -> None:
        self.ticks += 1

    async def gauges(self) -> list[Gauge]:
        return [Gauge("open_alerts", 2, {"kind": "data_limit_reached", "group": "HF1"})]


async def test_ticker_ticks_only_while_every_shard_is_caught_up() -> None:
    """tick() is called while the consumer is caught up, never while it is behind."""
    handler = Ticking()
    caught_up = False
    metrics = Metrics()

    async def is_caught_up() -> bool:
        return caught_up

    async with Ticker([handler], is_caught_up, metrics, interval=0.01):
        await asyncio.sleep(0.1)
        assert handler.ticks == 0
        caught_up = True
        await asyncio.sleep(0.1)
    assert handler.ticks > 0
    assert metrics.gauges["open_alerts:data_limit_reached:HF1"] == 2


class SlowToStop(Ticking):
    """Ticks, and on a cancelled tick runs on briefly (e.g. awaiting its script's reply)
    before it ends; flushes on request."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.started = asyncio.Event()

    async def tick(self) -> None:
        self.ticks += 1
        if self.ticks == 1:
            self.started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)
                raise

    async def flush(self) -> None:
        self.flushes += 1


async def test_last_tick_waits_for_a_call_abandoned_as_the_ticker_stopped_then_flushes() -> None:
    """A run that ended caught up ticks every ``Ticks`` handler once more and then flushes
    each ``Flushes`` one; a tick cut off when the ticker's task stopped, still ending, does
    not make its handler miss that last tick."""
    handler = SlowToStop()

    async def caught_up() -> bool:
        return True

    ticker = Ticker([handler], caught_up, Metrics(), interval=0.01, timeout=60)
    async with ticker:
        await handler.started.wait()
    with capture_logs() as logs:
        failed = await ticker.last_tick()
    assert failed == {}
    assert (handler.ticks, handler.flushes) == (2, 1)
    assert not [e for e in logs if e["event"] == "handler_periodic_call_failed"], logs
    assert [e["event"] for e in logs] == ["last_tick"]


class FailsToFinish(Ticking):
    """Ticks (with ``tick_fails``, its tick raises); its ``flush`` raises, or with
    ``left`` returns it: what it says it left undone."""

    def __init__(self, name: str, tick_fails: bool = False, left: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.tick_fails = tick_fails
        self.left = left

    async def tick(self) -> None:
        self.ticks += 1
        if self.tick_fails:
            raise ConnectionError("Redis went away")

    async def flush(self) -> str | None:
        if self.left is None:
            raise RuntimeError("the sink's client is closed")
        return self.left


async def test_last_tick_tells_what_each_handler_left_undone() -> None:
    """The last tick tells, by handler, what its tick and flush left undone: a call that
    failed (logged and counted as usual) or what its flush said it left; the run's exit
    status says so. A handler whose flush left nothing is not named."""
    fine, flush_fails = SlowToStop(), FailsToFinish("a")
    both_fail = FailsToFinish("b", tick_fails=True)
    left_some = FailsToFinish("c", left="2 alert transition(s) still in the outbox")
    fine.ticks = 1  # no first tick to wait for

    async def caught_up() -> bool:
        return False

    ticker = Ticker(
        [fine, flush_fails, both_fail, left_some], caught_up, Metrics(), interval=60, timeout=5
    )
    with capture_logs() as logs:
        left = await ticker.last_tick()
    assert left == {
        "a": "its flush failed",
        "b": "its last tick failed; its flush failed",
        "c": "2 alert transition(s) still in the outbox",
    }
    assert (fine.flushes, flush_fails.ticks, both_fail.ticks, left_some.ticks) == (1, 1, 1, 1)
    assert sorted(
        (e["handler"], e["method"]) for e in logs if e["event"] == "handler_periodic_call_failed"
    ) == [("a", "flush"), ("b", "flush"), ("b", "tick")]
