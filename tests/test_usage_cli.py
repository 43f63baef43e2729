"""``supersim-worker usage``: figures and sessions read back from what ``metering`` stored."""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import redis.asyncio

from worker import keys
from worker.cli import usage
from worker.devtools.simulator import SimulationOptions, generate
from worker.errors import ConfigError
from worker.events.decode import decode
from worker.events.records import ConnectionEvent
from worker.handlers.base import Batch
from worker.handlers.metering.handler import MeteringHandler
from worker.handlers.metering.settings import MeteringSettings

STREAM = "usage-stream"
GROUP = "usage-group"
FIRST, LAST = "2024-03-01", "2024-03-02"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    """Settings pointing at the test Redis and stream."""
    monkeypatch.setenv("SUPERSIM_REDIS_URL", redis_url)
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", STREAM)
    monkeypatch.setenv("SUPERSIM_CONSUMER_GROUP", GROUP)


@pytest.fixture
async def truth(env: None, redis_url: str) -> dict[str, Any]:
    """A simulated stream (two UTC days) metered into Redis; its ground truth."""
    records, found = generate(
        SimulationOptions(sims=12, hours=30, seed=21, duplicate_share=0.2, kore_share=0.5)
    )
    events = [e for e in map(decode, records) if isinstance(e, ConnectionEvent)]
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        handler = MeteringHandler(client, keys.prefix(STREAM, GROUP), MeteringSettings())
        for i in range(0, len(events), 500):
            await handler.handle(Batch("shardId-000000000000", events[i : i + 500]))
    finally:
        await client.aclose()
    return found


def cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    parser = argparse.ArgumentParser(prog="supersim-worker")
    usage.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["usage", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def busiest_sim(truth: dict[str, Any]) -> str:
    per_sim = truth["usage"]["per_sim"]
    return max(per_sim, key=lambda sim: per_sim[sim]["total"])


def test_table_shows_each_day_and_a_total(
    truth: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The default table has a row per UTC day with down, up and total, then a total row."""
    sim = busiest_sim(truth)
    out = cli(["--sim", sim, "--from", FIRST, "--to", LAST], capsys)
    lines = out.splitlines()
    assert lines[0].startswith(f"sim {sim}, 2024-03-01 to 2024-03-02")
    assert lines[1].split() == ["day", "down", "up", "total"]
    want = truth["usage"]["per_sim_day"][sim]
    for line, day in zip(lines[3:5], (FIRST, LAST), strict=True):
        figures = want.get(day, {"down": 0, "up": 0, "total": 0})
        assert line.split() == [
            day,
            str(figures["down"]),
            str(figures["up"]),
            str(figures["total"]),
        ]
    total = truth["usage"]["per_sim"][sim]
    assert lines[5].split() == ["total", str(total["down"]), str(total["up"]), str(total["total"])]


def test_csv_rows_equal_the_ground_truth_per_sim_and_day(
    truth: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--format csv`` gives one row per day, equal to the truth for every SIM."""
    for sim in truth["sims"]:
        out = cli(["--sim", sim, "--from", FIRST, "--to", LAST, "--format", "csv"], capsys)
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [r["day"] for r in rows] == [FIRST, LAST]
        got = {
            r["day"]: {k: int(r[k]) for k in ("down", "up", "total")}
            for r in rows
            if r["total"] != "0"
        }
        want = {d: v for d, v in truth["usage"]["per_sim_day"].get(sim, {}).items() if v["total"]}
        assert got == want


@pytest.mark.parametrize(
    ("option", "table", "pick"),
    [
        ("--fleet", "per_fleet", lambda sim: sim["fleet_sid"]),
        ("--account", "per_account", lambda sim: sim["account_sid"]),
        ("--network", "per_network", None),
    ],
)
def test_json_totals_per_fleet_account_and_network(
    truth: dict[str, Any], capsys: pytest.CaptureFixture[str], option: str, table: str, pick: Any
) -> None:
    """``--format json`` totals equal the truth for each fleet, account and visited network."""
    idents = (
        set(truth["usage"][table]) if pick is None else {pick(s) for s in truth["sims"].values()}
    )
    for ident in sorted(idents):
        out = cli([option, ident, "--from", FIRST, "--to", LAST, "--format", "json"], capsys)
        document = orjson.loads(out)
        assert document["granularity"] == "day"
        assert [r["period"] for r in document["rows"]] == [FIRST, LAST]
        want = truth["usage"][table].get(ident, {"down": 0, "up": 0, "total": 0})
        assert document["total"] == want


def test_hourly_rows_equal_the_ground_truth_per_hour(
    truth: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--hourly`` gives 24 rows per day, each equal to the truth for that UTC hour."""
    sim = busiest_sim(truth)
    out = cli(["--sim", sim, "--from", FIRST, "--to", LAST, "--hourly", "--format", "csv"], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 48
    assert rows[13]["hour"] == "2024-03-01T13:00Z"
    got = {r["hour"][:13]: int(r["total"]) for r in rows if r["total"] != "0"}
    want = {h: v["total"] for h, v in truth["usage"]["per_sim_hour"][sim].items() if v["total"]}
    assert got == want


def test_sessions_lists_a_sims_data_sessions(
    truth: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """``--sessions SIM`` lists the SIM's sessions, oldest first, shaped like DataSession."""
    sim = busiest_sim(truth)
    out = cli(["--sessions", sim, "--from", FIRST, "--to", LAST, "--format", "json"], capsys)
    found = orjson.loads(out)
    want = sorted(
        ((sid, s) for sid, s in truth["sessions"].items() if s["sim_sid"] == sim),
        key=lambda item: (item[1]["start"], item[0]),
    )
    assert [item["sid"] for item in found] == [sid for sid, _ in want]
    for item, (_, session) in zip(found, want, strict=True):
        assert (item["start"], item["end"]) == (session["start"], session["end"])
        assert (item["data_download"], item["data_upload"], item["data_total"]) == (
            session["down"],
            session["up"],
            session["total"],
        )
        assert item["sim_sid"] == sim
        assert {
            "radio_link",
            "operator_mcc",
            "operator_name",
            "cell_location_estimate",
            "imei",
        } <= item.keys()
    table = cli(["--sessions", sim, "--from", FIRST, "--to", LAST], capsys).splitlines()
    assert table[0].split()[:3] == ["sid", "start", "end"]
    assert len(table) == 2 + len(want)


def test_default_range_is_the_last_30_days(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --from/--to the figures cover the 30 UTC days ending today."""
    document = orjson.loads(cli(["--account", "AC0", "--format", "json"], capsys))
    today = datetime.now(UTC).date()
    assert document["to"] == today.isoformat()
    assert document["from"] == (today - timedelta(days=29)).isoformat()
    assert len(document["rows"]) == 30
    assert document["total"] == {"down": 0, "up": 0, "total": 0}


def test_missing_stream_name_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key prefix needs the stream name: without it the command fails with ConfigError."""
    monkeypatch.delenv("SUPERSIM_STREAM_NAME", raising=False)
    with pytest.raises(ConfigError, match="SUPERSIM_STREAM_NAME"):
        cli(["--sim", "HS0"], capsys)


def test_from_after_to_is_a_config_error(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty date range is refused rather than printing nothing."""
    with pytest.raises(ConfigError, match="after --to"):
        cli(["--sim", "HS0", "--from", LAST, "--to", FIRST], capsys)


def test_exactly_one_subject_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    """--sim, --fleet, --account, --network and --sessions exclude each other; one is needed."""
    with pytest.raises(SystemExit):
        cli([], capsys)
    with pytest.raises(SystemExit):
        cli(["--sim", "HS0", "--fleet", "HF0"], capsys)
    with pytest.raises(SystemExit):
        cli(["--sim", "HS0", "--from", "March"], capsys)
