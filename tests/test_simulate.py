"""The fleet simulator: reproducible streams in the documented format, with an exact truth."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest

from worker.cli.simulate import add_parser, run
from worker.devtools.simulator import SimulationOptions, generate, truth_path, write
from worker.devtools.simulator.core import dump_truth
from worker.errors import ConfigError

REFERENCE = Path("/work/shared/reference/samples")
START = datetime(2024, 3, 1, 20, 0, tzinfo=UTC)
KINDS = (
    "attachment.accepted",
    "attachment.rejected",
    "attachment.failed",
    "data-session.started",
    "data-session.updated",
    "data-session.ended",
    "data-session.failed",
)
TEST_TYPES = ("com.twilio.eventstreams.test-event", "com.kore.eventstreams.test.event")

Stream = tuple[list[bytes], dict[str, Any]]


# --- helpers ----------------------------------------------------------------------------


def parse(records: list[bytes]) -> list[dict[str, Any]]:
    """Records as dicts, ``data`` always an object (string form decoded)."""
    out = []
    for raw in records:
        record = orjson.loads(raw)
        if isinstance(record["data"], str):
            record["data"] = orjson.loads(record["data"])
        out.append(record)
    return out


def kind_of(record: dict[str, Any]) -> str:
    return str(record["type"]).split("supersim.connection.", 1)[1]


def network_key(data: dict[str, Any]) -> str:
    net = data["network"]
    return f"{net['iso_country']}-{net['mcc']}-{net['mnc']}"


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def connection_events(records: list[bytes]) -> list[dict[str, Any]]:
    """Unique connection events (``data`` objects with their kind), in event-time order."""
    seen: dict[str, dict[str, Any]] = {}
    for record in parse(records):
        if record["type"] in TEST_TYPES:
            continue
        seen.setdefault(record["data"]["event_sid"], {**record["data"], "kind": kind_of(record)})
    return sorted(seen.values(), key=lambda d: d["timestamp"])


def add(table: dict[str, list[int]], key: str, down: int, up: int) -> None:
    pair = table.setdefault(key, [0, 0])
    pair[0] += down
    pair[1] += up


def as_usage(table: dict[str, list[int]]) -> dict[str, dict[str, int]]:
    return {k: {"down": d, "up": u, "total": d + u} for k, (d, u) in table.items()}


def usage_sum(values: Any) -> dict[str, int]:
    total = {"down": 0, "up": 0, "total": 0}
    for value in values:
        for key in total:
            total[key] += value[key]
    return total


def max_in_window(times: list[int], seconds: int) -> int:
    """The most events within any ``seconds``-long window."""
    times = sorted(times)
    best = lo = 0
    for hi, t in enumerate(times):
        while t - times[lo] > seconds:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def options(**changes: Any) -> SimulationOptions:
    base = SimulationOptions(
        sims=150, hours=30, seed=7, start=START, outage=True, failure_bursts=True
    )
    return replace(base, **changes)


# --- fixtures (generated once per module) ------------------------------------------------


@pytest.fixture(scope="module")
def stream() -> Stream:
    """150 SIMs over 30 hours crossing two UTC midnights, with every injected episode."""
    return generate(options())


@pytest.fixture(scope="module")
def events(stream: Stream) -> list[dict[str, Any]]:
    return connection_events(stream[0])


@pytest.fixture(scope="module")
def ended_only() -> Stream:
    return generate(options(subscription="ended-only"))


DELIVERY = SimulationOptions(
    sims=40,
    hours=6,
    seed=11,
    start=START,
    duplicate_share=0.2,
    kore_share=0.5,
    data_as_string_share=0.3,
    shuffle_window=300,
    test_events=10,
)


@pytest.fixture(scope="module")
def delivered() -> Stream:
    """A small stream with every delivery quirk switched on."""
    return generate(DELIVERY)


# --- reproducibility --------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(delivered: Stream) -> None:
    """The same options give byte-identical records and truth."""
    records, truth = generate(DELIVERY)
    assert records == delivered[0]
    assert orjson.dumps(truth, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        delivered[1], option=orjson.OPT_SORT_KEYS
    )


def test_same_seed_is_identical_across_interpreters(delivered: Stream) -> None:
    """A fresh interpreter with another hash seed produces the same bytes (no hash(), no clock)."""
    script = (
        "import datetime, hashlib, sys\n"
        "from worker.devtools.simulator import SimulationOptions, generate\n"
        "from worker.devtools.simulator.core import dump_truth\n"
        f"records, truth = generate({DELIVERY!r})\n"
        "sys.stdout.write(hashlib.sha256(b'\\n'.join(records) + dump_truth(truth)).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).parent.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    expected = hashlib.sha256(b"\n".join(delivered[0]) + dump_truth(delivered[1])).hexdigest()
    assert result.stdout == expected


def test_different_seed_gives_different_stream(delivered: Stream) -> None:
    """Another seed gives other records and other usage."""
    records, truth = generate(replace(DELIVERY, seed=12))
    assert records != delivered[0]
    assert truth["usage"]["fleet_total"] != delivered[1]["usage"]["fleet_total"]
    assert set(truth["sims"]).isdisjoint(delivered[1]["sims"])


# --- format -----------------------------------------------------------------------------


ENVELOPE_KEYS = ["specversion", "type", "source", "id", "dataschema", "datacontenttype", "time"]
HEX32 = "[0-9a-f]{32}"
PATTERNS = {
    "event_sid": f"EZ{HEX32}",
    "account_sid": f"AC{HEX32}",
    "sim_sid": f"HS{HEX32}",
    "fleet_sid": f"HF{HEX32}",
    "sim_iccid": "8988307[0-9]{13}",
    "imsi": "[0-9]{15}",
    "timestamp": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
    "data_session_sid": f"PI{HEX32}",
    "ip_address": r"100\.(6[4-9]|[7-9]\d|1[01]\d|12[0-7])\.\d+\.\d+",
}


def test_records_follow_the_documented_envelope(stream: Stream) -> None:
    """Every Twilio record has the documented envelope, ids and time formats."""
    for record in parse(stream[0]):
        data = record["data"]
        assert list(record) == [*ENVELOPE_KEYS, "data"]
        assert "2024-03-01T20:00:00Z" <= data["timestamp"] < "2024-03-03T02:00:00Z"
        assert record["specversion"] == "1.0"
        assert record["datacontenttype"] == "application/json"
        assert record["type"] == data["event_type"]
        assert record["type"].startswith("com.twilio.iot.supersim.connection.")
        assert kind_of(record) in KINDS
        assert record["id"] == data["event_sid"]
        assert record["source"] == f"/v1/SuperSim/ConnectionEvents/{data['event_sid']}"
        assert (
            record["dataschema"] == "https://events-schemas.twilio.com/SuperSim.ConnectionEvent/2"
        )
        assert record["time"] == data["timestamp"][:-1] + ".000Z"
        for key, pattern in PATTERNS.items():
            if key in data:
                assert re.fullmatch(pattern, data[key]), (key, data[key])
        imei = data.get("imei")
        assert imei is None or re.fullmatch("[0-9]{15}", imei)
        assert set(data["network"]) == {"mcc", "mnc", "sid", "friendly_name", "iso_country"}
        location = data.get("location")
        assert location is None or (
            isinstance(location["lat"], float) and isinstance(location["cell_id"], str)
        )


def test_error_and_data_fields_appear_only_where_documented(
    stream: Stream, events: list[dict[str, Any]]
) -> None:
    """error only on rejected/failed kinds with their codes; byte fields only on updated/ended;
    data_modifier only on data-limit SIMs."""
    sims = stream[1]["sims"]
    codes = {
        "attachment.rejected": {83702, 83703, 83704, 83705},
        "attachment.failed": {83700},
        "data-session.failed": {83701},
    }
    for data in events:
        kind = data["kind"]
        assert ("error" in data) == (kind in codes)
        if "error" in data:
            assert data["error"]["code"] in codes[kind]
            assert data["error"]["message"]
        assert ("apn" in data) == kind.startswith("data-session.")
        windowed = kind in ("data-session.updated", "data-session.ended")
        assert ("data_total" in data) == windowed
        assert ("data_session_data_total" in data) == windowed
        assert ("data_session_end_time" in data) == (kind == "data-session.ended")
        if windowed:
            assert data["data_total"] == data["data_download"] + data["data_upload"]
            assert data["timestamp"] == data["data_session_update_end_time"]
        if "data_modifier" in data:
            assert data["data_modifier"] == "blocked"
            assert sims[data["sim_sid"]]["behaviour"] == "data_limit"
    assert {d["kind"] for d in events} == set(KINDS)


def test_sample_key_sets_appear_in_generated_events(events: list[dict[str, Any]]) -> None:
    """The reference samples' envelope, data, network and location key sets are generated."""
    found: Counter[str] = Counter()
    for name in ("attachment-rejected", "data-session-updated"):
        sample = orjson.loads((REFERENCE / f"{name}.json").read_bytes())
        kind = kind_of(sample)
        keys = set(sample["data"])
        for data in events:
            if data["kind"] == kind and set(data) - {"kind"} == keys:
                assert set(data["network"]) == set(sample["data"]["network"])
                if data["location"] is not None and sample["data"]["location"] is not None:
                    assert set(data["location"]) == set(sample["data"]["location"])
                found[name] += 1
    assert found["attachment-rejected"] > 0
    assert found["data-session-updated"] > 0


# --- sessions and usage -------------------------------------------------------------------


def test_session_windows_sum_to_cumulative_totals(events: list[dict[str, Any]]) -> None:
    """Windows are contiguous from the session start and sum to the ended cumulative totals."""
    by_session: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for data in events:
        if "data_total" in data:
            by_session[data["data_session_sid"]].append(data)
    assert len(by_session) > 100
    for windows in by_session.values():
        windows.sort(key=lambda d: d["data_session_update_end_time"])
        assert [w["kind"] for w in windows][-1] == "data-session.ended"
        assert windows[0]["data_session_update_start_time"] == windows[0]["data_session_start_time"]
        for before, after in pairwise(windows):
            assert after["data_session_update_start_time"] == before["data_session_update_end_time"]
        for window in windows[:-1]:
            length = ts(window["data_session_update_end_time"]) - ts(
                window["data_session_update_start_time"]
            )
            assert 355 <= length <= 365
        last = windows[-1]
        down = sum(w["data_download"] for w in windows)
        up = sum(w["data_upload"] for w in windows)
        assert (last["data_session_data_download"], last["data_session_data_upload"]) == (down, up)
        assert last["data_session_data_total"] == down + up
        assert last["data_session_end_time"] == last["data_session_update_end_time"]


def test_no_session_crosses_utc_midnight(stream: Stream, events: list[dict[str, Any]]) -> None:
    """Every session starts and ends on the same UTC day, and some end at 23:59:59."""
    ends = [d for d in events if d["kind"] == "data-session.ended"]
    assert all(d["data_session_start_time"][:10] == d["data_session_end_time"][:10] for d in ends)
    assert any(d["data_session_end_time"].endswith("T23:59:59Z") for d in ends)
    for session in stream[1]["sessions"].values():
        assert session["start"][:10] == session["end"][:10]


def test_usage_breakdowns_add_up(stream: Stream) -> None:
    """per_sim_hour sums to per_sim_day, which sums to per_sim; every breakdown sums to the total."""
    usage = stream[1]["usage"]
    total = usage["fleet_total"]
    assert total["total"] > 0
    for sim, days in usage["per_sim_day"].items():
        assert usage_sum(days.values()) == usage["per_sim"][sim]
        for day, value in days.items():
            hours = [v for h, v in usage["per_sim_hour"][sim].items() if h.startswith(day)]
            assert usage_sum(hours) == value
    assert set(usage["per_sim_day"]) == set(usage["per_sim"]) == set(usage["per_sim_hour"])
    for name in ("per_sim", "per_network", "per_fleet", "per_account", "per_day"):
        assert usage_sum(usage[name].values()) == total, name
    assert len(usage["per_day"]) == 3
    sessions = stream[1]["sessions"].values()
    assert usage_sum(sessions) == total


def test_truth_equals_metering_every_window(stream: Stream, events: list[dict[str, Any]]) -> None:
    """Metering the stream's windows by update end hour and day reproduces the truth."""
    per_sim_day: dict[str, dict[str, list[int]]] = defaultdict(dict)
    per_sim_hour: dict[str, dict[str, list[int]]] = defaultdict(dict)
    per_network: dict[str, list[int]] = {}
    for data in events:
        if "data_total" in data:
            end = data["data_session_update_end_time"]
            down, up = data["data_download"], data["data_upload"]
            add(per_sim_day[data["sim_sid"]], end[:10], down, up)
            add(per_sim_hour[data["sim_sid"]], end[:13], down, up)
            add(per_network, network_key(data), down, up)
    usage = stream[1]["usage"]
    assert {s: as_usage(d) for s, d in per_sim_day.items()} == usage["per_sim_day"]
    assert {s: as_usage(h) for s, h in per_sim_hour.items()} == usage["per_sim_hour"]
    assert as_usage(per_network) == usage["per_network"]


def test_ended_only_meters_the_same_daily_usage(stream: Stream, ended_only: Stream) -> None:
    """An ended-only stream is the full stream minus updated events, and its cumulative totals
    give the same per-SIM daily usage as every window of the full stream."""
    full = [r for r in stream[0] if b'connection.data-session.updated"' not in r[:120]]
    assert ended_only[0] == full
    assert ended_only[1]["usage"] == stream[1]["usage"]
    assert ended_only[1]["events_by_kind"]["data-session.updated"] == 0
    assert ended_only[1]["ended_only_exact"] is True
    per_sim_day: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for data in connection_events(ended_only[0]):
        assert data["kind"] != "data-session.updated"
        if data["kind"] == "data-session.ended":
            add(
                per_sim_day[data["sim_sid"]],
                data["data_session_end_time"][:10],
                data["data_session_data_download"],
                data["data_session_data_upload"],
            )
    assert {s: as_usage(d) for s, d in per_sim_day.items()} == stream[1]["usage"]["per_sim_day"]


def test_schema_v1_omits_cumulative_fields_and_says_ended_only_is_inexact() -> None:
    """v1 events lack the cumulative fields and the truth flags ended-only metering as inexact;
    mixed picks one schema per SIM."""
    small = SimulationOptions(sims=30, hours=3, seed=5, start=START)
    records, truth = generate(replace(small, schema_version=1))
    assert truth["ended_only_exact"] is False
    assert truth["usage"]["fleet_total"]["total"] > 0
    for record in parse(records):
        assert record["dataschema"].endswith("/1")
        assert "data_session_data_total" not in record["data"]
    records, truth = generate(replace(small, schema_version="mixed"))
    assert truth["ended_only_exact"] is False
    schema_by_sim: dict[str, set[str]] = defaultdict(set)
    for record in parse(records):
        schema_by_sim[record["data"]["sim_sid"]].add(record["dataschema"][-1])
        assert ("data_session_data_total" in record["data"]) == (
            record["dataschema"].endswith("/2") and "data_total" in record["data"]
        )
    assert all(len(v) == 1 for v in schema_by_sim.values())
    assert set().union(*schema_by_sim.values()) == {"1", "2"}


# --- behaviours and episodes --------------------------------------------------------------


def test_normal_sims_never_storm_and_inactive_sims_never_attach(
    stream: Stream, events: list[dict[str, Any]]
) -> None:
    """Normal SIMs have at most 3 rejections in any 5 minutes (the outage included); inactive
    SIMs are never accepted; attach-loop SIMs never start a data session."""
    sims = stream[1]["sims"]
    rejections: dict[str, list[int]] = defaultdict(list)
    kinds_by_sim: dict[str, set[str]] = defaultdict(set)
    for data in events:
        kinds_by_sim[data["sim_sid"]].add(data["kind"])
        if data["kind"] == "attachment.rejected":
            rejections[data["sim_sid"]].append(ts(data["timestamp"]))
    behaviours = Counter(s["behaviour"] for s in sims.values())
    assert set(behaviours) == {"normal", "inactive", "data_limit", "attach_loop"}
    for sim, info in sims.items():
        if info["behaviour"] in ("normal", "data_limit"):
            assert max_in_window(rejections[sim], 300) <= 3
            assert max_in_window(rejections[sim], 300) < 10
        if info["behaviour"] == "inactive":
            assert kinds_by_sim[sim] <= {"attachment.rejected"}
        if info["behaviour"] == "attach_loop":
            assert kinds_by_sim[sim] <= {"attachment.accepted"}


def test_rejection_storms_are_in_the_truth(stream: Stream, events: list[dict[str, Any]]) -> None:
    """Each storm: 15-60 rejections 3-20 s apart with its codes and networks; storms of one SIM
    are at least 30 minutes apart; every inactive SIM rejection belongs to a storm."""
    storms = stream[1]["rejection_storms"]
    assert storms
    by_sim: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for data in events:
        if data["kind"] == "attachment.rejected":
            by_sim[data["sim_sid"]].append(data)
    covered = 0
    for storm in storms:
        inside = [
            d for d in by_sim[storm["sim_sid"]] if storm["first"] <= d["timestamp"] <= storm["last"]
        ]
        assert len(inside) == storm["count"]
        assert 15 <= storm["count"] <= 60
        assert Counter(str(d["error"]["code"]) for d in inside) == storm["codes"]
        assert set(storm["codes"]) <= {"83704", "83705"}
        assert sorted({network_key(d) for d in inside}) == storm["networks"]
        gaps = [ts(b["timestamp"]) - ts(a["timestamp"]) for a, b in pairwise(inside)]
        assert all(3 <= gap <= 20 for gap in gaps)
        covered += storm["count"]
    sims = stream[1]["sims"]
    assert covered == sum(len(v) for s, v in by_sim.items() if sims[s]["behaviour"] == "inactive")
    starts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for storm in storms:
        starts[storm["sim_sid"]].append(storm)
    for sim_storms in starts.values():
        for a, b in pairwise(sim_storms):
            assert ts(b["first"]) - ts(a["last"]) >= 1800


def test_outage_and_failure_bursts_are_in_the_stream(
    stream: Stream, events: list[dict[str, Any]]
) -> None:
    """The fleet episode has >= 25 distinct SIMs of one fleet rejected 83702 on one network
    within 3 minutes; each failure burst has >= 12 failures for one SIM within 5 minutes."""
    (episode,) = stream[1]["fleet_rejection_episodes"]
    hit = {
        d["sim_sid"]
        for d in events
        if d["kind"] == "attachment.rejected"
        and d["error"]["code"] == 83702
        and d["fleet_sid"] == episode["fleet_sid"]
        and network_key(d) == episode["network"]
        and episode["first"] <= d["timestamp"] <= episode["last"]
    }
    assert len(hit) == episode["distinct_sims"] >= 25
    assert ts(episode["last"]) - ts(episode["first"]) <= 180
    bursts = {b["kind"]: b for b in stream[1]["failure_bursts"]}
    assert set(bursts) == {"attachment.failed", "data-session.failed"}
    assert bursts["attachment.failed"]["sim_sid"] != bursts["data-session.failed"]["sim_sid"]
    for kind, burst in bursts.items():
        times = [
            ts(d["timestamp"])
            for d in events
            if d["kind"] == kind
            and d["sim_sid"] == burst["sim_sid"]
            and burst["first"] <= d["timestamp"] <= burst["last"]
        ]
        assert len(times) == burst["count"] >= 12
        assert ts(burst["last"]) - ts(burst["first"]) <= 300


def test_attach_loops_and_data_limits_are_in_the_truth(
    stream: Stream, events: list[dict[str, Any]]
) -> None:
    """Attach loops are >= 8 accepts within 5 minutes; blocked stretches carry zero bytes
    and end at the next UTC day."""
    loops = stream[1]["attach_loops"]
    assert loops
    for loop in loops:
        times = [
            ts(d["timestamp"])
            for d in events
            if d["kind"] == "attachment.accepted"
            and d["sim_sid"] == loop["sim_sid"]
            and loop["first"] <= d["timestamp"] <= loop["last"]
        ]
        assert len(times) == loop["count"]
        assert max_in_window(times, 300) >= 8
        assert all(20 <= b - a <= 60 for a, b in pairwise(times))
    episodes = stream[1]["data_limit_episodes"]
    assert any(e["unblocked_at"] is not None for e in episodes)
    for episode in episodes:
        assert stream[1]["sims"][episode["sim_sid"]]["behaviour"] == "data_limit"
        if episode["unblocked_at"] is not None:
            assert episode["unblocked_at"][:10] > episode["blocked_at"][:10]
    for data in events:
        if data.get("data_modifier") == "blocked" and "data_total" in data:
            assert data["data_total"] == 0


# --- delivery options ---------------------------------------------------------------------


def test_delivery_counts_add_up(delivered: Stream) -> None:
    """records = unique events + duplicates + test events, and the kinds match the stream."""
    records, truth = delivered
    assert truth["records"] == len(records)
    assert len(records) == truth["unique_events"] + truth["duplicates_written"] + 10
    parsed = parse(records)
    connection = [r for r in parsed if r["type"] not in TEST_TYPES]
    sids = Counter(r["data"]["event_sid"] for r in connection)
    assert len(sids) == truth["unique_events"]
    assert sum(n - 1 for n in sids.values()) == truth["duplicates_written"]
    assert 0.1 < truth["duplicates_written"] / truth["unique_events"] < 0.3
    unique = {r["data"]["event_sid"]: kind_of(r) for r in connection}
    assert Counter(unique.values()) == +Counter(truth["events_by_kind"])
    assert sum(truth["events_by_kind"].values()) == truth["unique_events"]


def test_kore_envelopes_and_cross_vendor_duplicates(delivered: Stream) -> None:
    """Both envelopes appear, KORE's with its own type, source and dataschema but the same data;
    some duplicated events are written once in each envelope."""
    parsed = [r for r in parse(delivered[0]) if r["type"] not in TEST_TYPES]
    vendors: dict[str, set[str]] = defaultdict(set)
    data_by_sid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in parsed:
        data = record["data"]
        data_by_sid[data["event_sid"]].append(data)
        if record["type"].startswith("com.kore.supersim.connection."):
            vendors[data["event_sid"]].add("kore")
            assert record["source"] == "kore-events"
            assert record["dataschema"].startswith(
                "https://events-schemas.korewireless.com/SuperSim.ConnectionEvent/"
            )
            assert data["event_type"].startswith("com.twilio.iot.supersim.connection.")
        else:
            vendors[data["event_sid"]].add("twilio")
    counts = delivered[1]["records_by_envelope"]
    assert counts["kore"] > 0
    assert counts["twilio"] > 0
    assert any(v == {"kore", "twilio"} for v in vendors.values())
    assert all(len({orjson.dumps(d) for d in copies}) == 1 for copies in data_by_sid.values())


def test_data_as_string_parses_to_the_same_object(delivered: Stream) -> None:
    """String-form data decodes to exactly the object the same seed writes without the option."""
    plain, _ = generate(replace(DELIVERY, data_as_string_share=0.0))
    assert len(plain) == len(delivered[0])
    strings = 0
    for raw, reference in zip(delivered[0], plain, strict=True):
        record, expected = orjson.loads(raw), orjson.loads(reference)
        if isinstance(record["data"], str) and record["type"] not in TEST_TYPES:
            strings += 1
            assert orjson.loads(record["data"]) == expected["data"]
            record["data"] = expected["data"]
        assert record == expected
    assert strings == delivered[1]["data_as_string"] > 0


def test_shuffle_window_bounds_how_far_records_move(delivered: Stream) -> None:
    """With a window, records leave time order by at most the window; without, they keep it."""
    shuffled = [r["data"] for r in parse(delivered[0]) if r["type"] not in TEST_TYPES]
    times = [ts(d["timestamp"]) for d in shuffled]
    assert times != sorted(times)
    latest = 0
    for t in times:
        assert t >= latest - 300
        latest = max(latest, t)
    ordered, _ = generate(replace(DELIVERY, shuffle_window=0))
    times = [ts(r["time"]) for r in parse(ordered)]
    assert times == sorted(times)
    assert sorted(ordered) == sorted(delivered[0])


def test_sink_test_events_of_both_vendors_are_sprinkled_in(delivered: Stream) -> None:
    """Test events of both kinds: Twilio's data is a string, KORE's an object, id an account."""
    tests = [orjson.loads(r) for r in delivered[0] if b"eventstreams.test" in r[:80]]
    assert len(tests) == delivered[1]["test_events"] == 10
    assert {t["type"] for t in tests} == set(TEST_TYPES)
    accounts = {s["account_sid"] for s in delivered[1]["sims"].values()}
    for test in tests:
        assert test["id"] in accounts
        assert test["source"] == "Sink"
        if test["type"] == TEST_TYPES[0]:
            assert set(orjson.loads(test["data"])) == {"test_id"}
        else:
            assert set(test["data"]) == {"test_id"}


def test_fleets_and_accounts_partition_the_sims() -> None:
    """Every fleet belongs to one account and every account owns a fleet."""
    _, truth = generate(SimulationOptions(sims=40, hours=2, seed=3, fleets=4, accounts=2))
    fleets: dict[str, set[str]] = defaultdict(set)
    for sim in truth["sims"].values():
        fleets[sim["fleet_sid"]].add(sim["account_sid"])
    assert len(fleets) == 4
    assert all(len(accounts) == 1 for accounts in fleets.values())
    assert len(set().union(*fleets.values())) == 2


# --- options, files and the command line --------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"sims": 0},
        {"hours": 0},
        {"hours": -1.0},
        {"kore_share": 1.5},
        {"duplicate_share": -0.1},
        {"inactive_share": 0.6, "data_limit_share": 0.6},
        {"accounts": 4, "fleets": 3},
        {"start": datetime(2024, 3, 1)},
        {"schema_version": 3},
    ],
)
def test_invalid_options_are_rejected(changes: dict[str, Any]) -> None:
    """Out-of-range options raise ValueError naming the option."""
    with pytest.raises(ValueError, match=next(iter(changes)).split("_")[0]):
        replace(SimulationOptions(sims=1, hours=1, seed=1), **changes)


def test_outage_needs_a_big_enough_fleet() -> None:
    """An outage cannot be injected into a fleet with fewer than 25 normal SIMs."""
    with pytest.raises(ValueError, match="25 normal SIMs"):
        generate(SimulationOptions(sims=20, hours=1, seed=1, outage=True))


def test_write_produces_jsonl_and_truth(tmp_path: Path) -> None:
    """write() writes one record per line and <stem>.truth.json with sorted keys."""
    chosen = SimulationOptions(sims=10, hours=2, seed=4)
    out = tmp_path / "sub" / "events.jsonl"
    path = write(chosen, out)
    assert path == truth_path(out) == tmp_path / "sub" / "events.truth.json"
    records, truth = generate(chosen)
    assert out.read_bytes() == b"".join(r + b"\n" for r in records)
    written = orjson.loads(path.read_bytes())
    assert written == orjson.loads(orjson.dumps(truth))
    assert list(written) == sorted(written)
    assert written["options"]["start"] == "2024-03-01T00:00:00Z"


def test_cli_simulate_writes_files_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The simulate subcommand parses every flag, writes both files and prints one line."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "s.jsonl"
    flags = (
        "simulate --sims 30 --hours 1.5 --seed 9 --start 2024-05-01T23:00:00Z"
        " --inactive-share 0.1 --data-limit-share 0.1 --attach-loop-share 0.1"
        " --roaming-share 0.5 --failure-bursts --duplicates 0.1 --shuffle-window 60"
        " --kore-share 0.2 --data-as-string-share 0.2 --test-events 3 --schema-version mixed"
        " --subscription ended-only --fleets 2 --accounts 2"
    )
    args = parser.parse_args([*flags.split(), "--out", str(out)])
    assert args.func is run
    assert run(args) == 0
    line = capsys.readouterr().out
    truth = orjson.loads((tmp_path / "s.truth.json").read_bytes())
    assert f"wrote {truth['records']} records" in line
    assert "s.truth.json" in line
    assert len(out.read_bytes().splitlines()) == truth["records"]
    assert truth["options"]["schema_version"] == "mixed"
    assert truth["options"]["subscription"] == "ended-only"
    assert truth["options"]["start"] == "2024-05-01T23:00:00Z"
    assert len(truth["failure_bursts"]) == 2


def test_cli_rejects_invalid_values(tmp_path: Path) -> None:
    """Bad flag values stop argparse; inconsistent options raise ConfigError."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = ["simulate", "--sims", "5", "--hours", "1", "--seed", "1", "--out", str(tmp_path / "x")]
    for bad in (
        ["--kore-share", "2"],
        ["--hours", "0"],
        ["--sims", "0"],
        ["--schema-version", "3"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(base + bad)
    args = parser.parse_args([*base, "--fleets", "1", "--accounts", "2"])
    with pytest.raises(ConfigError, match="accounts"):
        run(args)


def test_start_may_be_relative_to_now(tmp_path: Path) -> None:
    """--start now-30m starts the period 30 minutes before the wall clock, on a whole second."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    base = ["simulate", "--sims", "5", "--hours", "1", "--seed", "1", "--out", str(tmp_path / "x")]
    before = datetime.now(UTC).replace(microsecond=0)
    for flag, seconds in (("now", 0), ("now-30m", -1800), ("now+2h", 7200), ("now-45s", -45)):
        start = parser.parse_args([*base, "--start", flag]).start
        after = datetime.now(UTC)
        assert start.microsecond == 0
        assert before.timestamp() + seconds <= start.timestamp() <= after.timestamp() + seconds
    for bad in (
        "now-",
        "now-3w",
        "yesterday",
        "2024-05-01T00:00:00",
        "1969-12-31T23:59:59Z",  # events the worker dead-letters (before 1970)
        "1970-01-01T00:30:00+01:00",
        "now-30000d",
        "now+9999999d",
    ):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--start", bad])


def test_the_default_start_is_the_simulators() -> None:
    """The command line names the simulator's default start without importing it."""
    from worker.cli.simulate import DEFAULT_START_TEXT
    from worker.devtools.simulator.options import DEFAULT_START

    assert datetime.fromisoformat(DEFAULT_START_TEXT) == DEFAULT_START
