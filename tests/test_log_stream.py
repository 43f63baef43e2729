"""One log stream: the standard library's records (botocore, asyncio, a handler's own
``logging``) come out as the same redacted JSON lines as ours, each with the version and,
once bound, the stream, consumer group and replica; ``--version`` names the version.

The module also serves as a handler for the worker subprocesses below
(``test_log_stream:create`` with ``PYTHONPATH=tests``): a third-party handler that logs
what it sees through ``logging`` and fails once with personal data in its message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from events import LOCATION, SESSION, SIM, make_record
from kinesis_support import create_stream, put

from worker import logs
from worker.cli.main import main
from worker.handlers.base import Batch, HandlerContext
from worker.version import package_version

TESTS = Path(__file__).parent
IMSI, IMEI, ICCID, IP = SIM["imsi"], SIM["imei"], SIM["sim_iccid"], SESSION["ip_address"]
SECRETS = (IMSI, IMEI, ICCID, IP, LOCATION["cell_id"], str(LOCATION["lat"]))
VERSION = package_version()


# --- the handler the worker subprocesses load -----------------------------------------------


class ChattyHandler:
    """Logs every event's identifiers through the standard library, the way a library or
    a careless third-party handler would; its first batch fails quoting an IMSI."""

    name = "chatty"

    def __init__(self) -> None:
        self._log = logging.getLogger("thirdparty.chatty")
        self._failed = False

    async def handle(self, batch: Batch) -> None:
        for event in batch.events:
            data = event.data
            self._log.info("saw imsi=%s imei %s iccid %s", data.imsi, data.imei, data.sim_iccid)
        if not self._failed:
            self._failed = True
            try:
                raise LookupError(f"no tariff for IMSI {IMSI} at {IP}")
            except LookupError:
                self._log.exception("tariff lookup failed")
                raise

    async def close(self) -> None:
        return None


def create(_: HandlerContext[Any]) -> ChattyHandler:
    return ChattyHandler()


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test may configure logging; the previous set-up comes back after it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()
    logs.reset()


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text``, parsed: fails on the first that is not JSON."""
    parsed = []
    for line in text.splitlines():
        if line.strip():
            try:
                value = orjson.loads(line)
            except orjson.JSONDecodeError:
                pytest.fail(f"not a JSON line: {line[:300]!r}")
            assert isinstance(value, dict), line
            parsed.append(value)
    return parsed


def assert_no_pii(text: str) -> None:
    for value in SECRETS:
        assert value not in text, f"{value} leaked"


def run_worker_process(endpoint: str, redis_url: str, stream: str) -> tuple[int, str, str]:
    """``python -m worker run --until-caught-up`` at DEBUG with JSON logs: exit status,
    stdout, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")}
    env.update(
        PYTHONPATH=str(TESTS),
        SUPERSIM_STREAM_NAME=stream,
        SUPERSIM_ENDPOINT_URL=endpoint,
        SUPERSIM_REDIS_URL=redis_url,
        SUPERSIM_HANDLERS="log,test_log_stream:create",
        SUPERSIM_INITIAL_POSITION="TRIM_HORIZON",
        SUPERSIM_IDLE_INTERVAL="0.2",
        SUPERSIM_LOG_FORMAT="json",
        SUPERSIM_LOG_LEVEL="DEBUG",
    )
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--until-caught-up"],
        env=env,
        capture_output=True,
        timeout=90,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def consume_with_debug_logs(endpoint: str, redis_url: str) -> list[dict[str, Any]]:
    """Put events with personal data (and one broken record quoting an IMSI) on a new
    stream, consume it in a worker process at DEBUG, and return its lines, all JSON and
    free of personal data."""
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(endpoint, stream, shards=1)
    records = [
        make_record("attachment.accepted", seq=1),
        make_record("data-session.started", seq=2),
        make_record("data-session.updated", seq=3),
        b'{"imsi": "' + IMSI.encode() + b'", "ip_address": "' + IP.encode() + b'", ',
    ]
    await put(endpoint, stream, records)
    status, out, err = await asyncio.to_thread(run_worker_process, endpoint, redis_url, stream)
    assert status == 0, err[-3000:]
    assert_no_pii(out + err)
    return json_lines(out) + json_lines(err)


# --- a worker process ------------------------------------------------------------------------


async def test_every_line_of_a_worker_is_redacted_json(moto_endpoint: str, redis_url: str) -> None:
    """At DEBUG a worker's every line, botocore's, asyncio's and a handler's own
    ``logging`` included, is a JSON object with the version and no raw IMSI, IMEI, ICCID
    or IP address."""
    lines = await consume_with_debug_logs(moto_endpoint, redis_url)
    loggers = {str(line.get("logger", "")).split(".")[0] for line in lines}
    assert {"botocore", "asyncio", "thirdparty"} <= loggers
    assert all(line["version"] == VERSION for line in lines)
    assert all("level" in line and "timestamp" in line for line in lines)
    events = {line["event"] for line in lines}
    assert {"worker_started", "dead_lettered", "handler_failed", "worker_stopped"} <= events
    chatty = [line for line in lines if line.get("logger") == "thirdparty.chatty"]
    assert any(line["event"].startswith(f"saw imsi={logs.REDACTED}") for line in chatty)
    (failed,) = [line for line in chatty if line["event"] == "tariff lookup failed"]
    assert failed["level"] == "error"
    assert "LookupError" in orjson.dumps(failed["exception"]).decode()


async def test_worker_lines_carry_stream_group_and_replica(
    moto_endpoint: str, redis_url: str
) -> None:
    """From start-up on, every line of a worker names its stream, consumer group and
    replica: the id its leases are held under."""
    lines = await consume_with_debug_logs(moto_endpoint, redis_url)
    started = next(i for i, line in enumerate(lines) if line["event"] == "worker_started")
    bound = lines[started:]
    assert {line.get("stream") for line in bound} == {lines[started]["stream"]}
    assert {line.get("consumer_group") for line in bound} == {"supersim-worker"}
    assert len({line.get("replica") for line in bound}) == 1
    assert all(line.get("replica") for line in bound)
    (shard_started,) = [line for line in bound if line["event"] == "shard_started"]
    assert shard_started["replica"] == shard_started["owner"]


# --- configured in this process --------------------------------------------------------------


def test_library_records_are_json_lines_like_ours(capsys: pytest.CaptureFixture[str]) -> None:
    """A standard library record becomes a JSON line with level, ISO UTC timestamp,
    logger name, version and bound context, its message scrubbed of personal data."""
    logs.configure("json", "INFO")
    structlog.contextvars.bind_contextvars(shard_id="shardId-000000000001")
    logging.getLogger("botocore.endpoint").warning(
        "retrying %s for %s at %s", "GetRecords", IMSI, IP
    )
    err = capsys.readouterr().err
    assert_no_pii(err)
    (line,) = json_lines(err)
    assert line["event"] == f"retrying GetRecords for {logs.REDACTED} at {logs.REDACTED}"
    assert (line["level"], line["logger"]) == ("warning", "botocore.endpoint")
    assert line["timestamp"].endswith("Z")
    assert line["version"] == VERSION
    assert line["shard_id"] == "shardId-000000000001"


def test_library_exceptions_are_structured_and_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A library's ``logger.exception`` renders its traceback as structured JSON, with
    personal data in the exception message redacted."""
    logs.configure("json", "INFO")
    try:
        raise ConnectionError(f"peer {IP} reset while sending {ICCID}")
    except ConnectionError:
        logging.getLogger("aiohttp.client").exception("request failed")
    err = capsys.readouterr().err
    assert_no_pii(err)
    (line,) = json_lines(err)
    assert line["level"] == "error"
    assert isinstance(line["exception"], list)
    assert "ConnectionError" in orjson.dumps(line["exception"]).decode()


def test_kinesis_payloads_in_debug_dumps_are_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A record's base64 payload in a library's dump of a body is replaced by the marker."""
    logs.configure("json", "DEBUG")
    body = b'{"Records":[{"Data":"eyJpbXNpIjoiNzMyMTIzMjAwNTYzMTg3In0=","PartitionKey":"HSx"}]}'
    logging.getLogger("botocore.parsers").debug("Response body:\n%r", body)
    (line,) = json_lines(capsys.readouterr().err)
    assert "eyJpbXNp" not in line["event"]
    assert f'"Data":"{logs.REDACTED}' in line["event"]
    assert '"PartitionKey":"HSx"' in line["event"]


@pytest.mark.parametrize("redact", [True, False])
def test_session_tokens_in_signed_request_dumps_are_hidden(
    redact: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A role's session token in botocore's dump of a signed request is replaced, whether
    or not personal data is redacted: it is a credential."""
    logs.configure("json", "DEBUG", redact=redact)
    token = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQ=="
    logging.getLogger("botocore.endpoint").debug(
        "Sending http request: headers={'X-Amz-Security-Token': b'%s'}", token
    )
    logging.getLogger("botocore.auth").debug("CanonicalRequest:\nx-amz-security-token:%s", token)
    err = capsys.readouterr().err
    assert token not in err
    assert [line["event"].count(logs.REDACTED) for line in json_lines(err)] == [1, 1]


def test_library_records_follow_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    """Below ``SUPERSIM_LOG_LEVEL`` library records are dropped like ours."""
    logs.configure("json", "WARNING")
    logging.getLogger("redis.connection").info("connected")
    logging.getLogger("redis.connection").warning("reconnecting")
    assert [line["event"] for line in json_lines(capsys.readouterr().err)] == ["reconnecting"]


def test_library_records_in_console_format_are_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a console, library records are rendered like ours, redacted the same way."""
    logs.configure("console", "INFO")
    logging.getLogger("thirdparty").info("imei %s", IMEI)
    err = capsys.readouterr().err
    assert_no_pii(err)
    assert "imei [redacted]" in err
    assert "thirdparty" in err


def test_redaction_off_shows_library_messages_as_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With ``SUPERSIM_REDACT_PII=false`` library messages are left as they are too."""
    logs.configure("json", "INFO", redact=False)
    logging.getLogger("thirdparty").info("imsi %s", IMSI)
    (line,) = json_lines(capsys.readouterr().err)
    assert line["event"] == f"imsi {IMSI}"


def test_warnings_are_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    """A warning shown by ``warnings`` is a JSON line of the ``py.warnings`` logger."""
    logs.configure("json", "INFO")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"deprecated call for {IMSI}", DeprecationWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert_no_pii(err)
    (line,) = json_lines(err)
    assert (line["logger"], line["level"]) == ("py.warnings", "warning")
    assert "DeprecationWarning" in line["event"]


def test_uncaught_exceptions_are_logged_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    """In JSON, an uncaught exception is an ``uncaught_exception`` line, not a bare
    traceback, its message redacted."""
    logs.configure("json", "INFO")
    error = RuntimeError(f"unexpected IMSI {IMSI}")
    sys.excepthook(RuntimeError, error, None)
    err = capsys.readouterr().err
    assert_no_pii(err)
    (line,) = json_lines(err)
    assert (line["event"], line["level"]) == ("uncaught_exception", "critical")


def test_bind_process_reaches_our_lines_and_library_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After ``bind_process`` every line names the stream, group and replica; a field the
    event sets itself is kept."""
    logs.configure("json", "INFO")
    logs.bind_process(stream="events", group="g1", replica="host:1:abcd")
    structlog.get_logger("worker").info("ours")
    structlog.get_logger("worker").info("explicit", stream="other")
    logging.getLogger("redis").warning("theirs")
    lines = json_lines(capsys.readouterr().err)
    assert [line["event"] for line in lines] == ["ours", "explicit", "theirs"]
    for line in lines:
        assert (line["consumer_group"], line["replica"], line["version"]) == (
            "g1",
            "host:1:abcd",
            VERSION,
        )
    assert [line["stream"] for line in lines] == ["events", "other", "events"]


def test_bind_process_without_our_set_up_binds_context_variables() -> None:
    """When structlog was configured elsewhere, the fields go to the context variables."""
    logs.bind_process(stream="events", group="g1", replica="r", version="9.9")
    assert structlog.contextvars.get_contextvars() == {
        "stream": "events",
        "consumer_group": "g1",
        "replica": "r",
        "version": "9.9",
    }


def test_reset_takes_our_handler_off_the_root_logger() -> None:
    """``reset`` leaves the root logger, ``warnings`` and the exception hook as they were."""
    root = logging.getLogger()
    before = (list(root.handlers), root.level, sys.excepthook)
    logs.configure("json", "DEBUG")
    assert any(isinstance(h, logs.StderrHandler) for h in root.handlers)
    assert root.level == logging.DEBUG
    logs.configure("json", "INFO")  # again: still one handler of ours
    assert sum(isinstance(h, logs.StderrHandler) for h in root.handlers) == 1
    logs.reset()
    assert (list(root.handlers), root.level, sys.excepthook) == before


def test_renders_json_tells_the_configured_format() -> None:
    """``renders_json`` is true only after a JSON set-up."""
    structlog.reset_defaults()
    assert not logs.renders_json()
    logs.configure("console", "INFO")
    assert not logs.renders_json()
    logs.configure("json", "INFO")
    assert logs.renders_json()


def test_a_command_failure_is_a_json_line_once_logs_are_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that fails after setting up JSON logs reports it as a redacted
    ``command_failed`` line, not as text."""
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", "events")
    monkeypatch.setenv("SUPERSIM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("SUPERSIM_LOG_FORMAT", "json")
    assert main(["dlq", "list"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1" not in err
    (line,) = [line for line in json_lines(err) if line["event"] == "command_failed"]
    assert line["error"].startswith("cannot reach Redis")
    assert line["level"] == "error"


def test_version_flag_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    """``supersim-worker --version`` prints the version of the installed distribution,
    the one every log line carries."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"supersim-worker {VERSION}\n"
    assert VERSION != "unknown"
