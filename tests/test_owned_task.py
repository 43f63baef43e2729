"""An owned task stops when its owner exits, even if it loses a cancellation."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from worker import owned_task
from worker.owned_task import OwnedTask


class Forgetful(OwnedTask):
    """Loops like a ticker and loses the first ``lose`` cancellations it gets, as a library
    swallowing a cancellation would."""

    name = "forgetful"

    def __init__(self, lose: int) -> None:
        super().__init__()
        self.lose = lose
        self.lost = 0
        self.rounds = 0

    async def _run(self) -> None:
        while True:
            self.rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if self.lost >= self.lose:
                    raise
                self.lost += 1


async def test_a_task_that_lost_its_cancellation_is_cancelled_again() -> None:
    task = Forgetful(lose=2)
    with capture_logs() as logs:
        async with task:
            await asyncio.sleep(0.05)
    assert task._task is not None
    assert task._task.cancelled()
    assert task.lost == 2
    warned = [e for e in logs if e["event"] == "background_task_ignored_cancellation"]
    assert warned
    assert warned[0]["cancellations"] == 3


async def test_a_task_that_never_stops_is_left_behind_after_the_patience(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(owned_task, "STOP_PATIENCE", 0.3)
    monkeypatch.setattr(owned_task, "CANCEL_AGAIN_AFTER", 0.05)
    task = Forgetful(lose=10**9)
    with capture_logs() as logs:
        async with task:
            await asyncio.sleep(0.02)
    assert task._task is not None
    assert not task._task.done()
    assert [e["task"] for e in logs if e["event"] == "background_task_abandoned"] == ["forgetful"]
    task.lose = 0  # let it go now, so the test leaves no task behind
    task._task.cancel()
    await asyncio.wait({task._task})
