"""``supersim-worker alerts list``: the episodes open now and the recent alerts, read from
what real alert handlers keep in a real Redis (their open episodes, the stream sink's
alerts stream), as a table or JSON lines, filtered by kind and fleet."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from alerts_support import (
    FLEET_A,
    FLEET_B,
    SIM_A,
    SIM_B,
    Clock,
    at,
    close_all,
    event,
    feed,
    finish,
    handler,
    stream_alerts,
)
from redis.asyncio import Redis

from worker.cli.main import main
from worker.events.records import ConnectionEvent
from worker.handlers.alerts.handler import AlertHandler

SIM_C = "HS" + "c" * 32


@pytest.fixture(autouse=True)
def _alerts_env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """The command reads the state the handlers below write: stream ``alerts-test``,
    group ``g``, the stream sink on."""
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", "alerts-test")
    monkeypatch.setenv("SUPERSIM_CONSUMER_GROUP", "g")
    monkeypatch.setenv("SUPERSIM_REDIS_URL", redis_url)
    monkeypatch.setenv("SUPERSIM_ALERTS__SINKS", "log,stream")


def storm(sim: str, fleet: str, seq0: int) -> list[ConnectionEvent]:
    """12 rejections of one SIM within 2 minutes: a rejection storm."""
    return [event("attachment.rejected", seq0 + i, i * 10, sim=sim, fleet=fleet) for i in range(12)]


def blocked(sim: str, fleet: str, seq: int, seconds: float) -> ConnectionEvent:
    """A SIM blocked at its data limit: the episode stays open until it is unblocked."""
    return event(
        "data-session.updated", seq, seconds, sim=sim, fleet=fleet, data_modifier="blocked"
    )


async def alert_handlers(redis: Redis, clock: Clock) -> list[AlertHandler]:
    return [handler("rejections", redis, clock), handler("data_limit", redis, clock)]


async def listed(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    """``alerts list --json ARGS``, parsed."""
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["alerts", "list", "--json", *args]) == 0
    return [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]


def section(rows: Sequence[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [row for row in rows if row["section"] == name]


def without_listing_fields(row: dict[str, Any]) -> dict[str, Any]:
    """The alert itself, without what ``list`` adds (section, handler, stream id, time)."""
    return {k: v for k, v in row.items() if k not in {"section", "handler", "stream_id", "sent_at"}}


async def test_open_episodes_read_as_their_opening_alert(
    redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each open episode is listed as the alert that opened it (same id, counts, range),
    with the handler that keeps it; per-SIM, per-fleet (distinct SIMs) and data-limit
    episodes alike."""
    clock = Clock(at(3600))
    handlers = await alert_handlers(redis, clock)
    fleet_wide = [
        event(
            "attachment.rejected",
            500 + i,
            30 + i,
            sim=f"HS{i:032x}",
            fleet=FLEET_B,
            error__code=83702,
        )
        for i in range(20)
    ]
    await feed(handlers, [*storm(SIM_A, FLEET_A, 0), *fleet_wide, blocked(SIM_B, FLEET_B, 900, 60)])
    await finish(handlers, at(180))
    opened = {alert["id"]: alert for alert in await stream_alerts(redis)}
    rows = await listed(capsys, "--open")
    assert all(row["section"] == "open" for row in rows)
    assert {row["kind"]: row["handler"] for row in rows} == {
        "rejection_storm": "rejections",
        "fleet_network_rejections": "rejections",
        "data_limit_reached": "data_limit",
    }
    assert {row["id"] for row in rows} == set(opened)
    for row in rows:
        assert without_listing_fields(row) == opened[row["id"]]
    fleet_row = next(row for row in rows if row["kind"] == "fleet_network_rejections")
    assert (fleet_row["count"], fleet_row["fleet_sid"]) == (20, FLEET_B)
    await close_all(handlers)


async def test_recent_alerts_are_newest_first_and_resolved_episodes_leave_the_open_list(
    redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once a storm goes quiet it is no longer open; the recent alerts, newest first, show
    its resolution above its opening; ``--limit`` keeps the newest."""
    clock = Clock(at(3600))
    handlers = await alert_handlers(redis, clock)
    await feed(handlers, [*storm(SIM_A, FLEET_A, 0), blocked(SIM_B, FLEET_B, 900, 60)])
    await finish(handlers, at(180))
    await finish(handlers, at(2000))  # the storm has been quiet for 5 min; the block lasts
    rows = await listed(capsys)
    (still_open,) = section(rows, "open")
    assert (still_open["kind"], still_open["sim_sid"]) == ("data_limit_reached", SIM_B)
    recent = section(rows, "recent")
    stream = await stream_alerts(redis)
    assert [without_listing_fields(row) for row in recent] == stream[::-1]
    assert (recent[0]["kind"], recent[0]["status"]) == ("rejection_storm", "resolved")
    assert [row["stream_id"] for row in recent] == sorted(
        (row["stream_id"] for row in recent),
        key=lambda sid: tuple(map(int, sid.split("-"))),
        reverse=True,
    )
    assert all(row["sent_at"].endswith("+00:00") for row in recent)
    newest = section(await listed(capsys, "--limit", "1"), "recent")
    assert newest == recent[:1]
    await close_all(handlers)


async def test_kind_and_fleet_filters(redis: Redis, capsys: pytest.CaptureFixture[str]) -> None:
    """``--kind`` and ``--fleet`` keep the open episodes and recent alerts that match both."""
    clock = Clock(at(3600))
    handlers = await alert_handlers(redis, clock)
    await feed(
        handlers,
        [
            *storm(SIM_A, FLEET_A, 0),
            *storm(SIM_B, FLEET_B, 100),
            blocked(SIM_C, FLEET_B, 900, 60),
        ],
    )
    await finish(handlers, at(180))
    by_fleet = await listed(capsys, "--fleet", FLEET_B)
    assert {row["fleet_sid"] for row in by_fleet} == {FLEET_B}
    assert {(row["section"], row["kind"]) for row in by_fleet} == {
        ("open", "rejection_storm"),
        ("open", "data_limit_reached"),
        ("recent", "rejection_storm"),
        ("recent", "data_limit_reached"),
    }
    both = await listed(capsys, "--kind", "rejection_storm", "--fleet", FLEET_A)
    assert {(row["section"], row["sim_sid"]) for row in both} == {
        ("open", SIM_A),
        ("recent", SIM_A),
    }
    assert await listed(capsys, "--kind", "attach_loop") == []
    await close_all(handlers)


async def test_the_table_shows_open_episodes_then_recent_alerts(
    redis: Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ``--json`` the command prints a table of open episodes, then one of recent
    alerts; ``--open`` leaves the second out."""
    clock = Clock(at(3600))
    handlers = await alert_handlers(redis, clock)
    await feed(handlers, storm(SIM_A, FLEET_A, 0))
    await finish(handlers, at(180))
    (alert,) = await stream_alerts(redis)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["alerts", "list"]) == 0
    out = capsys.readouterr().out
    head, _, tail = out.partition("\n\n")
    assert head.splitlines()[0] == "open episodes: 1"
    assert head.splitlines()[1].split() == [
        "OPENED",
        "KIND",
        "SUBJECT",
        "FLEET",
        "COUNT",
        "LAST",
        "EVENT",
        "ID",
    ]
    row = head.splitlines()[2].split()
    assert row[2:6] == ["rejection_storm", f"sim:{SIM_A}", FLEET_A, "12"]
    assert row[-1] == alert["id"]
    assert tail.splitlines()[0] == "recent alerts: 1 (newest first, at most 20)"
    assert tail.splitlines()[2].split()[2:4] == ["open", "rejection_storm"]
    assert await asyncio.to_thread(main, ["alerts", "list", "--open"]) == 0
    assert "recent alerts" not in capsys.readouterr().out
    await close_all(handlers)


async def test_without_the_stream_sink_the_table_says_where_recent_alerts_come_from(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With nothing in the alerts stream and the stream sink off, the table says which
    sink keeps recent alerts; open episodes are listed all the same."""
    clock = Clock(at(3600))
    handlers = await alert_handlers(redis, clock)
    await feed(handlers, [blocked(SIM_B, FLEET_B, 900, 60)])
    await finish(handlers, at(180))
    await redis.delete("{sw:alerts-test:g}:alerts")
    monkeypatch.setenv("SUPERSIM_ALERTS__SINKS", "log")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["alerts", "list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("open episodes: 1\n")
    assert "recent alerts: 0" in out
    assert "SUPERSIM_ALERTS__SINKS=log,stream" in out
    await close_all(handlers)


def test_an_unknown_kind_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``--kind`` accepts the alert kinds only (argparse exits 2, listing them)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["alerts", "list", "--kind", "storm"])
    assert exit_info.value.code == 2
    assert "rejection_storm" in capsys.readouterr().err
