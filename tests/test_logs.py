"""Logging set-up: JSON lines or console output, context variables, and personal data
(IMSI, IMEI, ICCID, IP address, location) replaced by a marker unless redaction is off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from events import LOCATION, SIM, make_record
from structlog.testing import capture_logs

from worker import logs
from worker.events.decode import decode
from worker.events.records import ConnectionEvent
from worker.logs import PII_KEYS, REDACTED, redact_pii, scrub_text

IMSI, IMEI, ICCID = SIM["imsi"], SIM["imei"], SIM["sim_iccid"]
IP = "100.68.56.159"
SECRETS = (IMSI, IMEI, ICCID, IP, LOCATION["cell_id"], str(LOCATION["lat"]))


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Each test may configure structlog; the previous configuration comes back after it."""
    saved = structlog.get_config()
    structlog.contextvars.clear_contextvars()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


def json_lines(stderr: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stderr.splitlines() if line.strip()]


def assert_no_pii(text: str) -> None:
    for value in SECRETS:
        assert value not in text, f"{value} leaked into: {text}"


# --- the processor -----------------------------------------------------------------------------


def test_top_level_personal_fields_are_redacted() -> None:
    """imsi, imei, sim_iccid, ip_address, location, lat/lon/cell_id/lac become the marker."""
    event = {
        "event": "e",
        "imsi": IMSI,
        "imei": IMEI,
        "iccid": ICCID,
        "sim_iccid": ICCID,
        "ip_address": IP,
        "location": dict(LOCATION),
        "lat": 1.0,
        "lon": 2.0,
        "cell_id": "1",
        "lac": "2",
        "sim_sid": "HS00",
    }
    out = redact_pii(None, "info", dict(event))
    assert {k for k, v in out.items() if v == REDACTED} == PII_KEYS
    assert out["sim_sid"] == "HS00"
    assert out["event"] == "e"


def test_null_personal_fields_stay_null() -> None:
    """A personal field that is None is left None (nothing to hide, and it says 'absent')."""
    assert redact_pii(None, "info", {"event": "e", "imei": None})["imei"] is None


def test_personal_fields_one_level_down_are_redacted() -> None:
    """A dict value holding personal keys has those keys redacted, the rest kept."""
    out = redact_pii(None, "info", {"event": "e", "sim": {"imsi": IMSI, "sim_sid": "HS00"}})
    assert out["sim"] == {"imsi": REDACTED, "sim_sid": "HS00"}


def test_personal_fields_deeper_down_are_redacted() -> None:
    """A whole CloudEvent logged as a dict has its data's personal fields redacted."""
    event = orjson.loads(make_record())
    out = redact_pii(None, "info", {"event": "bad_record", "record": event})
    assert_no_pii(orjson.dumps(out).decode())
    assert out["record"]["data"]["sim_sid"] == SIM["sim_sid"]


def test_personal_fields_inside_lists_are_redacted() -> None:
    """Dicts inside a list value (a batch of events) are redacted too."""
    batch = [orjson.loads(make_record(seq=i))["data"] for i in range(3)]
    out = redact_pii(None, "info", {"event": "batch", "events": batch})
    assert_no_pii(orjson.dumps(out).decode())
    assert [e["event_sid"] for e in out["events"]] == [e["event_sid"] for e in batch]


def test_decoded_event_data_is_redacted() -> None:
    """A decoded event's data model passed as a log value is logged without personal data."""
    event = decode(make_record())
    assert isinstance(event, ConnectionEvent)
    out = redact_pii(
        None, "info", {"event": "e", "data": event.data, "network": event.data.network}
    )
    rendered = structlog.processors.JSONRenderer(serializer=orjson.dumps)(None, "info", out)
    assert_no_pii(rendered.decode() if isinstance(rendered, bytes) else rendered)


def test_decoded_event_itself_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """A whole ConnectionEvent logged in JSON mode shows its sid but no personal data."""
    event = decode(make_record("attachment.accepted"))
    logs.configure("json", "INFO", redact=True)
    structlog.get_logger("test").warning("odd_event", event_obj=event)
    err = capsys.readouterr().err
    assert_no_pii(err)
    (line,) = json_lines(err)
    assert line["event_obj"]["envelope"]["data"]["event_sid"] == event.event_sid


def test_very_deep_values_are_redacted_whole() -> None:
    """Beyond the depth limit a nested container is replaced by the marker, not walked."""
    value: dict[str, Any] = {"imsi": IMSI}
    for _ in range(20):
        value = {"inner": value}
    out = redact_pii(None, "info", {"event": "e", "deep": value})
    assert_no_pii(orjson.dumps(out).decode())
    assert REDACTED in orjson.dumps(out).decode()


def test_redaction_does_not_change_the_callers_objects() -> None:
    """The logged dict's nested values are replaced by copies, never modified in place."""
    sim = {"imsi": IMSI}
    redact_pii(None, "info", {"event": "e", "sim": sim})
    assert sim == {"imsi": IMSI}


# --- configured output -------------------------------------------------------------------------


def test_json_logs_are_redacted_with_context(capsys: pytest.CaptureFixture[str]) -> None:
    """JSON lines carry level, ISO UTC timestamp and bound context; personal data is hidden."""
    logs.configure("json", "INFO", redact=True)
    structlog.contextvars.bind_contextvars(shard_id="shardId-000000000001")
    structlog.get_logger("test").info(
        "sim_attached", imsi=IMSI, sim_iccid=ICCID, ip_address=IP, location=dict(LOCATION)
    )
    err = capsys.readouterr().err
    assert_no_pii(err)
    (line,) = json_lines(err)
    assert line["event"] == "sim_attached"
    assert line["level"] == "info"
    assert line["shard_id"] == "shardId-000000000001"
    assert line["imsi"] == line["sim_iccid"] == line["location"] == REDACTED
    assert line["timestamp"].endswith("Z")


def test_json_logs_without_redaction_show_values(capsys: pytest.CaptureFixture[str]) -> None:
    """With redaction turned off (SUPERSIM_REDACT_PII=false) values are logged as given."""
    logs.configure("json", "INFO", redact=False)
    structlog.get_logger("test").info("sim_attached", imsi=IMSI)
    (line,) = json_lines(capsys.readouterr().err)
    assert line["imsi"] == IMSI


def test_console_logs_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """The console renderer (a terminal) redacts personal data too."""
    logs.configure("console", "INFO", redact=True)
    structlog.get_logger("test").warning("sim_attached", imsi=IMSI, imei=IMEI)
    err = capsys.readouterr().err
    assert "sim_attached" in err
    assert REDACTED in err
    assert_no_pii(err)


def test_auto_format_is_json_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """'auto' writes JSON when stderr is not a terminal (as under a container runtime)."""
    logs.configure("auto", "INFO")
    structlog.get_logger("test").info("hello", n=1)
    (line,) = json_lines(capsys.readouterr().err)
    assert line["n"] == 1


def test_level_filters_lower_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """With level WARNING, info and debug lines are dropped."""
    logs.configure("json", "WARNING")
    log = structlog.get_logger("test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["w"]


def test_exceptions_are_rendered_as_structured_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """log.exception() in JSON mode includes the exception as structured data."""
    logs.configure("json", "INFO")
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("test").exception("failed")
    (line,) = json_lines(capsys.readouterr().err)
    assert line["exception"][0]["exc_type"] == "ValueError"


def test_capture_logs_sees_events_for_assertions() -> None:
    """structlog.testing.capture_logs works with the configured logger (for other tests)."""
    logs.configure("json", "INFO")
    with capture_logs() as captured:
        structlog.get_logger("test").info("counted", events=3)
    assert captured == [{"event": "counted", "events": 3, "log_level": "info"}]


def _fail_with_personal_data_in_locals() -> None:
    record = {"imsi": IMSI, "sim_iccid": ICCID, "ip_address": IP}
    raise ValueError(f"bad record of {len(record)} fields, IMSI {record['imsi']}")


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_local_variables(
    fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A logged exception's frames carry no local variables (they may hold records), and
    its message is redacted like any error text."""
    logs.configure(fmt, "INFO", redact=True)
    try:
        _fail_with_personal_data_in_locals()
    except ValueError:
        structlog.get_logger("test").exception("handler_crashed")
    err = capsys.readouterr().err
    assert "handler_crashed" in err
    assert "bad record of 3 fields" in err
    assert_no_pii(err)


def test_personal_data_quoted_in_error_messages_is_redacted() -> None:
    """An exception message a handler raised may quote what it saw: identifiers and IP
    addresses in ``error``/``exception`` are replaced; sequence numbers and SIDs stay."""
    sequence = "49590338271490256608559692538361571095921575989136588898"
    message = (
        f"1 validation error: input_value={{'imsi': '{IMSI}', 'iccid': {ICCID}, "
        f"'imei': '{IMEI}', 'ip': '{IP}.', 'v6': '2001:db8::8a2e:370:7334', 'v6s': 'fe80::1'}} "
        f"at {sequence} for HS2f71995b834d803ff5376799ba59bd1d in 2022-12-14T13:40:52Z"
    )
    with capture_logs(processors=[redact_pii]) as captured:
        structlog.get_logger("test").warning("handler_failed", error=message, exception=message)
    (entry,) = captured
    for key in ("error", "exception"):
        text = entry[key]
        assert_no_pii(text)
        assert "2001:db8" not in text
        assert "fe80" not in text
        assert sequence in text
        assert "HS2f71995b834d803ff5376799ba59bd1d" in text
        assert "2022-12-14T13:40:52Z" in text


def test_location_and_named_fields_quoted_in_error_messages_are_redacted() -> None:
    """A handler quoting a location, or personal fields with their names, in its exception
    text: coordinates and the named values go; times, durations and SIDs stay."""
    message = (
        "ValueError: cannot place SIM: location=Location(cell_id='47322374', lac='15170', "
        "lat=34.166991, lon=-118.5720773) {'imsi': 'X-12', \"ip_address\": \"10.1.2.3\"} "
        "at 2022-12-14T13:40:52.123456Z after 0.25 s for HS2f71995b834d803ff5376799ba59bd1d"
    )
    with capture_logs(processors=[redact_pii]) as captured:
        structlog.get_logger("test").warning("handler_failed", error=message)
        structlog.get_logger("test").warning("alert", details={"codes": [{"message": message}]})
    for text in (captured[0]["error"], captured[1]["details"]["codes"][0]["message"]):
        for value in ("47322374", "15170", "34.166991", "118.5720773", "X-12", "10.1.2.3"):
            assert value not in text
        assert "lat=[redacted]" in text
        assert "2022-12-14T13:40:52.123456Z" in text
        assert "0.25 s" in text
        assert "HS2f71995b834d803ff5376799ba59bd1d" in text


def test_numbers_of_our_own_messages_are_not_redacted() -> None:
    """Durations, decimals and limits in messages stay readable; a lone decimal number is
    not a coordinate, and a long decimal fraction is not an identifier."""
    for text in (
        "Timeout after 12.5000 s",
        "took 0.30000000000000004 s",
        "latency: 3.14159 ms",
        "at 2022-12-14T13:40:52.123456Z",
        "sequence 49590338271490256608559692538361571095921575989136588898",
    ):
        assert scrub_text(text) == text
    assert scrub_text("IMSI 732123200563187.") == "IMSI [redacted]."
    assert scrub_text("at 34.166991, -118.5720773") == "at [redacted]"
