"""The fleet counter, tested with supersim-worker's kit (worker.testing) only."""

from __future__ import annotations

import pytest
from supersim_fleet_counter import CounterSettings, count, plugin

from worker.testing import HandlerRunner, SimulatedFleet, assert_idempotent, make_connection_event


async def test_counts_each_event_once_whatever_its_envelope(supersim_redis_url: str) -> None:
    """Three rejections, each also delivered by the other vendor, count three; counts expire."""
    events = [
        make_connection_event(
            "attachment.rejected", vendor, seq=seq, fleet="HF1", at="2024-03-01T10:00:00Z"
        )
        for seq in range(3)
        for vendor in ("twilio", "kore")
    ]
    async with HandlerRunner(plugin, supersim_redis_url, settings=CounterSettings()) as run:
        await run.feed(events)
        assert await count(run.redis, run.key_prefix, "HF1", "attachment.rejected", "20240301") == 3
        assert all(key.expires for key in (await run.state()).values())


async def test_is_idempotent(supersim_redis_url: str, supersim_fleet: SimulatedFleet) -> None:
    """Handled twice, shuffled, with duplicates in the other envelope: the same sets."""
    await assert_idempotent(
        plugin, supersim_redis_url, supersim_fleet.records, settings=CounterSettings()
    )


async def test_counts_a_fleet_like_the_simulators_truth(
    supersim_redis_url: str, supersim_fleet: SimulatedFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings from the environment; each fleet's counts per kind equal the truth's."""
    monkeypatch.setenv(
        "SUPERSIM_FLEET_COUNTER__KINDS", '["attachment.accepted", "data-session.ended"]'
    )
    async with HandlerRunner("fleet_counter", supersim_redis_url) as run:
        await run.feed_stream(supersim_fleet.records, shards=4)
        for fleet, kinds in supersim_fleet.truth["events_by_fleet"].items():
            for kind in ("attachment.accepted", "data-session.ended", "attachment.rejected"):
                expected = kinds.get(kind, 0) if kind in run.settings.kinds else 0
                assert await count(run.redis, run.key_prefix, fleet, kind) == expected
