"""Settings from the environment: ``SUPERSIM_`` variables, parsed once, with errors that name
the variable and what it accepts."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from worker.errors import ConfigError
from worker.handlers import registry
from worker.handlers.alerts.settings import AlertSettings
from worker.settings import (
    InitialPosition,
    LogFormat,
    LogLevel,
    Settings,
    load_settings,
    utc_timestamp,
)

PASSWORD = "hunter2-Secret"
REDISS = f"rediss://:{PASSWORD}@cache.example.com:6380/1"


@pytest.fixture(autouse=True)
def _no_supersim_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without SUPERSIM_ variables from the calling shell."""
    for name in list(os.environ):
        if name.upper().startswith("SUPERSIM_"):
            monkeypatch.delenv(name)


def config_error(**overrides: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    return str(info.value)


def test_defaults_without_any_variable() -> None:
    """With no SUPERSIM_ variables the documented defaults apply."""
    settings = load_settings()
    assert settings.handlers == ("log",)
    assert settings.region == "us-east-1"
    assert settings.endpoint_url is None
    assert settings.redis_dsn == "redis://127.0.0.1:6379/0"
    assert settings.log_format is LogFormat.AUTO
    assert settings.log_level is LogLevel.INFO
    assert settings.redact_pii is True
    assert settings.initial_position is InitialPosition.LATEST
    assert settings.batch_limit == 1000


def test_prefixed_variables_are_read_and_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    """SUPERSIM_<FIELD> sets each field, converted to its type."""
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", "supersim-events")
    monkeypatch.setenv("SUPERSIM_REGION", "eu-west-1")
    monkeypatch.setenv("SUPERSIM_BATCH_LIMIT", "500")
    monkeypatch.setenv("SUPERSIM_IDLE_INTERVAL", "0.25")
    monkeypatch.setenv("SUPERSIM_REDACT_PII", "false")
    monkeypatch.setenv("SUPERSIM_LOG_FORMAT", "json")
    monkeypatch.setenv("SUPERSIM_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("SUPERSIM_INITIAL_POSITION", "TRIM_HORIZON")
    settings = load_settings()
    assert settings.stream_name == "supersim-events"
    assert settings.region == "eu-west-1"
    assert settings.batch_limit == 500
    assert settings.idle_interval == 0.25
    assert settings.redact_pii is False
    assert settings.log_format is LogFormat.JSON
    assert settings.log_level is LogLevel.DEBUG
    assert settings.initial_position is InitialPosition.TRIM_HORIZON


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAM_NAME (no prefix) does not set the stream name."""
    monkeypatch.setenv("STREAM_NAME", "not-ours")
    assert load_settings().stream_name == ""


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    """supersim_stream_name works like SUPERSIM_STREAM_NAME."""
    monkeypatch.setenv("supersim_stream_name", "lower")
    assert load_settings().stream_name == "lower"


def test_explicit_overrides_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values passed to load_settings (CLI flags) win over the environment."""
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", "from-env")
    assert load_settings(stream_name="from-flag").stream_name == "from-flag"


def test_settings_are_frozen() -> None:
    """The settings object cannot be changed once built."""
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.stream_name = "changed"  # type: ignore[misc]


# --- handlers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("metering", ("metering",)),
        ("metering,log", ("metering", "log")),
        (" metering , log ,alerts ", ("metering", "log", "alerts")),
        ("log,,metering,", ("log", "metering")),
    ],
)
def test_handlers_are_comma_separated_in_order(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    """SUPERSIM_HANDLERS is a comma-separated list, kept in order, blanks dropped."""
    monkeypatch.setenv("SUPERSIM_HANDLERS", value)
    assert load_settings().handlers == expected


@pytest.mark.parametrize("value", ["", " ", " , ,"])
def test_handlers_must_name_one(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An empty SUPERSIM_HANDLERS is a ConfigError naming the variable."""
    monkeypatch.setenv("SUPERSIM_HANDLERS", value)
    message = config_error()
    assert "SUPERSIM_HANDLERS" in message
    assert "at least one handler" in message


# --- Kinesis endpoint ----------------------------------------------------------------------


def test_endpoint_defaults_to_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any endpoint variable, the AWS default endpoint (None) is used."""
    assert load_settings().kinesis_endpoint() is None


def test_aws_endpoint_url_kinesis_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_KINESIS (the standard service-specific variable) sets the endpoint."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", "http://127.0.0.1:4567")
    assert load_settings().kinesis_endpoint() == "http://127.0.0.1:4567"


def test_aws_endpoint_url_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL applies when no Kinesis-specific endpoint is set."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1111")
    assert load_settings().kinesis_endpoint() == "http://127.0.0.1:1111"


def test_supersim_endpoint_url_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """SUPERSIM_ENDPOINT_URL overrides the AWS variables."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", "http://127.0.0.1:4567")
    monkeypatch.setenv("SUPERSIM_ENDPOINT_URL", "http://127.0.0.1:9999")
    assert load_settings().kinesis_endpoint() == "http://127.0.0.1:9999"


def test_endpoint_from_an_explicit_environment() -> None:
    """kinesis_endpoint() reads a given mapping instead of os.environ when passed one."""
    settings = load_settings()
    assert settings.kinesis_endpoint({"AWS_ENDPOINT_URL_KINESIS": "http://k:1"}) == "http://k:1"
    assert settings.kinesis_endpoint({"AWS_ENDPOINT_URL_KINESIS": ""}) is None


# --- Redis URL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/2", REDISS, f"redis://user:{PASSWORD}@h:1/0", "unix:///r.sock"]
)
def test_redis_urls_are_accepted(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """redis://, rediss:// (with a password) and unix:// URLs are accepted as given."""
    monkeypatch.setenv("SUPERSIM_REDIS_URL", url)
    assert load_settings().redis_dsn == url


def test_redis_password_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Redis URL (and its password) is absent from repr, str and a JSON dump."""
    monkeypatch.setenv("SUPERSIM_REDIS_URL", REDISS)
    settings = load_settings()
    for shown in (
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(settings.redis_url),
    ):
        assert PASSWORD not in shown
        assert "cache.example.com" not in shown


def test_bad_redis_scheme_is_an_error_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL of another scheme fails naming SUPERSIM_REDIS_URL and the schemes, not the value."""
    monkeypatch.setenv("SUPERSIM_REDIS_URL", f"http://:{PASSWORD}@cache.example.com")
    message = config_error()
    assert "SUPERSIM_REDIS_URL" in message
    assert "redis://, rediss:// or unix://" in message
    assert PASSWORD not in message


# --- invalid values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("SUPERSIM_LOG_LEVEL", "verbose", "allowed: DEBUG, INFO, WARNING, ERROR"),
        ("SUPERSIM_LOG_FORMAT", "xml", "allowed: auto, json, console"),
        ("SUPERSIM_INITIAL_POSITION", "beginning", "allowed: LATEST, TRIM_HORIZON, AT_TIMESTAMP"),
    ],
)
def test_invalid_choice_names_the_variable_and_allowed_values(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    """A value outside a fixed set fails with the variable's name and every allowed value."""
    monkeypatch.setenv(variable, value)
    message = config_error()
    assert f"{variable}:" in message
    assert allowed in message


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("SUPERSIM_BATCH_LIMIT", "0", "greater than or equal to 1"),
        ("SUPERSIM_BATCH_LIMIT", "20000", "less than or equal to 10000"),
        ("SUPERSIM_BATCH_LIMIT", "many", "valid integer"),
        ("SUPERSIM_BATCH_LIMIT", "1.5", "valid integer"),
        ("SUPERSIM_IDLE_INTERVAL", "-1", "greater than 0"),
        ("SUPERSIM_SHUTDOWN_TIMEOUT", "soon", "valid number"),
        ("SUPERSIM_LEASE_TTL", "1", "greater than or equal to 3"),
        ("SUPERSIM_PREFETCH_BATCHES", "17", "less than or equal to 16"),
        ("SUPERSIM_DLQ_MAXLEN", "10", "greater than or equal to 100"),
        ("SUPERSIM_REDACT_PII", "maybe", "valid boolean"),
        ("SUPERSIM_CONSUMER_GROUP", "two words", "should match pattern"),
        ("SUPERSIM_INITIAL_TIMESTAMP", "2024-03-01T00:00:00", "timezone"),
        ("SUPERSIM_INITIAL_TIMESTAMP", "last tuesday", "datetime"),
    ],
)
def test_invalid_value_names_the_variable_and_the_rule(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    """An out-of-range or ill-typed value fails with the variable's name and the rule broken."""
    monkeypatch.setenv(variable, value)
    message = config_error()
    assert f"{variable}:" in message
    assert problem in message


def test_every_invalid_variable_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bad variables are all named in one error, so one fix round is enough."""
    monkeypatch.setenv("SUPERSIM_LOG_LEVEL", "loud")
    monkeypatch.setenv("SUPERSIM_BATCH_LIMIT", "0")
    message = config_error()
    assert "SUPERSIM_LOG_LEVEL:" in message
    assert "SUPERSIM_BATCH_LIMIT:" in message


def test_config_error_is_not_retriable() -> None:
    """A ConfigError is permanent: retrying cannot fix a setting."""
    assert ConfigError("x").retriable is False


# --- AT_TIMESTAMP ------------------------------------------------------------------------------


def test_at_timestamp_requires_a_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    """AT_TIMESTAMP without SUPERSIM_INITIAL_TIMESTAMP names the missing variable."""
    monkeypatch.setenv("SUPERSIM_INITIAL_POSITION", "AT_TIMESTAMP")
    message = config_error()
    assert "SUPERSIM_INITIAL_TIMESTAMP: required" in message


def test_at_timestamp_with_a_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    """AT_TIMESTAMP with an RFC 3339 time (any offset) is accepted as an aware datetime."""
    monkeypatch.setenv("SUPERSIM_INITIAL_POSITION", "AT_TIMESTAMP")
    monkeypatch.setenv("SUPERSIM_INITIAL_TIMESTAMP", "2024-03-01T02:00:00+02:00")
    settings = load_settings()
    assert settings.initial_timestamp == datetime(2024, 3, 1, tzinfo=UTC)


def test_utc_timestamp_parses_rfc3339() -> None:
    """utc_timestamp() returns an aware datetime for Z and offset times."""
    assert utc_timestamp("2024-03-01T00:00:00Z") == datetime(2024, 3, 1, tzinfo=UTC)
    parsed = utc_timestamp("2024-03-01T05:30:00+05:30")
    assert parsed.utcoffset() == timedelta(hours=5, minutes=30)
    assert parsed == datetime(2024, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "problem"),
    [("2024-03-01T00:00:00", "no UTC offset"), ("yesterday", "not an RFC 3339 time")],
)
def test_utc_timestamp_rejects_bad_times(value: str, problem: str) -> None:
    """A naive or unparsable time on the command line is a ConfigError saying which."""
    with pytest.raises(ConfigError, match=problem):
        utc_timestamp(value)


def test_settings_class_uses_one_prefix() -> None:
    """Every field is read from SUPERSIM_<FIELD>; nothing else configures the worker."""
    assert Settings.model_config.get("env_prefix") == "SUPERSIM_"


@pytest.mark.parametrize(
    ("value", "codes"),
    [
        ("83704,83705,83702", {83702, 83704, 83705}),
        ("83702", {83702}),
        ("[83704, 83702]", {83702, 83704}),
    ],
)
def test_fleet_ignore_codes_take_a_comma_list_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str, codes: set[int]
) -> None:
    monkeypatch.setenv("SUPERSIM_ALERTS__FLEET_IGNORE_CODES", value)
    alerts = registry.read_section("alerts", AlertSettings)
    assert isinstance(alerts, AlertSettings)
    assert alerts.fleet_ignore_codes == codes


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "SUPERSIM_ALERTS__FLEET_IGNORE_CODES",
            "83704,abc",
            "SUPERSIM_ALERTS__FLEET_IGNORE_CODES: ",
        ),
        ("SUPERSIM_ALERTS__FLEETS", "{bad", "SUPERSIM_ALERTS__FLEETS: Value error, not valid JSON"),
        ("SUPERSIM_ALERTS", "{bad", "take JSON"),
    ],
)
def test_malformed_structured_variables_are_named_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        registry.read_section("alerts", AlertSettings)
    text = str(info.value)
    assert text.startswith("invalid settings")
    assert message in text
