"""``supersim-worker decode FILE``: one line per record (its kind, or why it failed), a summary,
and exit status 1 if any record failed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from events import (
    SIM,
    make_event,
    make_other_event,
    make_record,
    make_sink_test_event,
    to_jsonl,
)

from worker.cli.main import main


def run(path: Path | str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    status = main(["decode", str(path)])
    return status, capsys.readouterr().out.splitlines()


def test_jsonl_of_valid_records_exits_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every record of a JSON Lines file is reported by line with kind, vendor and version."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        to_jsonl(
            [
                make_event("attachment.accepted"),
                make_event("data-session.updated", "kore", 1),
                make_event("data-session.ended", data_as_string=True),
            ]
        )
    )
    status, lines = run(path, capsys)
    assert status == 0
    assert (
        lines[0]
        == f"{path}:1: attachment.accepted (twilio, schema v2) {make_event('attachment.accepted')['id']}"
    )
    assert lines[1].startswith(f"{path}:2: data-session.updated (kore, schema v1) EZ")
    assert lines[2].startswith(f"{path}:3: data-session.ended (twilio, schema v2) EZ")
    assert lines[-1] == "3 records, 3 decoded, 0 failed"


def test_any_failed_record_exits_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One bad line among good ones: the others still decode, its error is shown, status 1."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        make_record("attachment.accepted")
        + b"\n"
        + make_record("data-session.updated", data_download=-1)
        + b"\nnot json at all\n"
        + make_record("attachment.rejected")
        + b"\n"
    )
    status, lines = run(path, capsys)
    assert status == 1
    assert lines[1] == (
        f"{path}:2: error: invalid data-session.updated event: "
        "data.data_download: Input should be greater than or equal to 0"
    )
    assert lines[2].startswith(f"{path}:3: error: record is not JSON")
    assert lines[3].startswith(f"{path}:4: attachment.rejected")
    assert lines[-1] == "4 records, 2 decoded, 2 failed"


def test_blank_lines_are_skipped_and_numbers_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Blank lines are not records; reported line numbers are the file's own."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n" + make_record() + b"\n\n   \n" + make_record(seq=1) + b"\n")
    status, lines = run(path, capsys)
    assert status == 0
    assert [line.split(":")[1] for line in lines[:-1]] == ["2", "5"]
    assert lines[-1] == "2 records, 2 decoded, 0 failed"


def test_sink_test_and_other_events_are_not_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sink test events and other CloudEvent types are reported as such, status 0."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        to_jsonl([make_sink_test_event("twilio"), make_sink_test_event("kore"), make_other_event()])
    )
    status, lines = run(path, capsys)
    assert status == 0
    assert lines[0].endswith("sink test event (twilio)")
    assert lines[1].endswith("sink test event (kore)")
    assert lines[2].endswith(
        "skipped: not a connection event (type com.twilio.messaging.message.delivered)"
    )


def test_single_pretty_json_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pretty-printed single event (as in the samples) is one record, not many lines."""
    path = tmp_path / "event.json"
    path.write_bytes(
        orjson.dumps(make_event("data-session.ended", "kore"), option=orjson.OPT_INDENT_2)
    )
    status, lines = run(path, capsys)
    assert status == 0
    assert lines[0].startswith(f"{path}:1: data-session.ended (kore, schema v2) EZ")
    assert lines[-1] == "1 records, 1 decoded, 0 failed"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (orjson.dumps(make_event(), option=orjson.OPT_INDENT_2)[:300], "record is not JSON"),
        (
            orjson.dumps([make_event(), make_event(seq=1)], option=orjson.OPT_INDENT_2),
            "record is a JSON array, expected a CloudEvent object",
        ),
        (
            orjson.dumps(make_event(), option=orjson.OPT_INDENT_2).replace(b"super", b"\xffuper"),
            "record is not UTF-8",
        ),
        (
            orjson.dumps(make_event(drop=("sim_iccid",)), option=orjson.OPT_INDENT_2),
            "data.sim_iccid: Field required",
        ),
    ],
    ids=["truncated", "array", "not-utf8", "missing-field"],
)
def test_broken_pretty_document_is_one_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, reason: str
) -> None:
    """A broken pretty-printed document is reported once with its reason, not line by line."""
    path = tmp_path / "event.json"
    path.write_bytes(content)
    status, lines = run(path, capsys)
    assert status == 1
    assert len(lines) == 2
    assert reason in lines[0]
    assert lines[-1] == "1 records, 0 decoded, 1 failed"


def test_errors_never_print_personal_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failure lines name fields, not their values (IMSI, ICCID)."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        to_jsonl([make_event(sim_iccid=int(SIM["sim_iccid"][:18]), imsi=[SIM["imsi"]])])
    )
    status, lines = run(path, capsys)
    assert status == 1
    assert SIM["imsi"] not in "\n".join(lines)
    assert SIM["sim_iccid"][:18] not in "\n".join(lines)


def test_empty_file_has_no_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty file decodes zero records and succeeds."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    status, lines = run(path, capsys)
    assert status == 0
    assert lines == ["0 records, 0 decoded, 0 failed"]


def test_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read exits 2 with a message, not a traceback."""
    status = main(["decode", str(tmp_path / "nope.jsonl")])
    assert status == 2
    assert "cannot read" in capsys.readouterr().err


def test_python_dash_m_worker_decode(tmp_path: Path) -> None:
    """`python -m worker decode` runs the same command: output on stdout, exit status 1."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(to_jsonl([make_event(), make_event("attachment.failed")]))
    ok = subprocess.run(
        [sys.executable, "-m", "worker", "decode", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode().splitlines()[-1] == "2 records, 2 decoded, 0 failed"

    path.write_bytes(path.read_bytes() + b"[]\n")
    failed = subprocess.run(
        [sys.executable, "-m", "worker", "decode", "-"],
        input=path.read_bytes(),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode == 1, failed.stderr.decode()
    out = failed.stdout.decode().splitlines()
    assert out[2] == "-:3: error: record is a JSON array, expected a CloudEvent object"
    assert out[-1] == "3 records, 2 decoded, 1 failed"
