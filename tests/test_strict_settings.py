"""Unknown ``SUPERSIM_*`` variables are refused at start-up, naming each one and the
closest valid name: the consumer's settings and the sections of every handler that can be
chosen (built-ins, entry points, import paths) are the valid names.

The module also serves as a third-party handler package (``test_strict_settings:plugin``)
with its own settings section, ``tariffs``.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field
from test_process import worker_env

from worker.cli.main import build_parser, check_environment, main
from worker.errors import ConfigError
from worker.handlers import registry
from worker.handlers.base import Batch, HandlerContext, Plugin
from worker.settings import Settings, is_service_link, variable_names

TESTS = Path(__file__).parent


# --- a third-party handler with its own settings ---------------------------------------------


class TariffWebhook(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = None
    timeout: float = 5.0


class TariffSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    rate: float = 1.0
    webhook: TariffWebhook = Field(default_factory=TariffWebhook)
    per_fleet: dict[str, float] = Field(default_factory=dict)


class TariffHandler:
    name = "tariffs"

    async def handle(self, batch: Batch) -> None:
        return None

    async def close(self) -> None:
        return None


def create(_: HandlerContext[TariffSettings]) -> TariffHandler:
    return TariffHandler()


plugin = Plugin(create, settings=TariffSettings, section="tariffs")
TARIFF_VARIABLES = {
    "SUPERSIM_TARIFFS": '{"rate": 2}',
    "SUPERSIM_TARIFFS__RATE": "1.5",
    "SUPERSIM_TARIFFS__WEBHOOK": '{"url": "https://example.com"}',
    "SUPERSIM_TARIFFS__WEBHOOK__URL": "https://example.com",
    "SUPERSIM_TARIFFS__WEBHOOK__TIMEOUT": "3",
    "SUPERSIM_TARIFFS__PER_FLEET": '{"HF1": 0.5}',
}


def refusal(environ: dict[str, str], handlers: tuple[str, ...] = ()) -> str:
    """The message of the ConfigError ``check_environment`` raises for ``environ``."""
    with pytest.raises(ConfigError) as info:
        registry.check_environment(environ, handlers=handlers)
    return str(info.value)


@pytest.fixture
def tariffs_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tariffs plugin registered as an installed package's entry point would be."""
    point = EntryPoint("tariffs", "test_strict_settings:plugin", registry.ENTRY_POINT_GROUP)
    real = registry.entry_points

    def entry_points(*, group: str) -> Any:
        return [point] if group == registry.ENTRY_POINT_GROUP else real(group=group)

    monkeypatch.setattr(registry, "entry_points", entry_points)


# --- the rule ----------------------------------------------------------------------------------


def test_a_misspelt_variable_fails_naming_the_closest_valid_name() -> None:
    """``SUPERSIM_HANDLER=metering`` (missing S) is refused, suggesting SUPERSIM_HANDLERS."""
    message = refusal({"SUPERSIM_HANDLER": "metering"})
    assert "SUPERSIM_HANDLER: unknown variable (did you mean SUPERSIM_HANDLERS?)" in message


def test_every_setting_and_every_section_variable_is_accepted() -> None:
    """Each consumer setting, and each built-in section's variables (the section as JSON,
    its fields, its nested models and their fields), passes in any case."""
    environ = dict.fromkeys(variable_names(Settings), "x")
    environ |= {
        "SUPERSIM_METERING": "{}",
        "SUPERSIM_METERING__SESSION_RETENTION_DAYS": "30",
        "SUPERSIM_ALERTS": "{}",
        "SUPERSIM_ALERTS__SINKS": "log",
        "SUPERSIM_ALERTS__WEBHOOK": "{}",
        "SUPERSIM_ALERTS__WEBHOOK__URL": "https://example.com",
        "SUPERSIM_ALERTS__THRESHOLDS__STORM_REJECTIONS": "5",
        "SUPERSIM_ALERTS__FLEETS": "{}",
        "supersim_stream_name": "lower case works too",
    }
    registry.check_environment(environ)


def test_variables_of_other_prefixes_are_not_ours() -> None:
    """Only ``SUPERSIM_`` variables are checked (``STREAM_NAME``, ``AWS_*`` are not)."""
    registry.check_environment({"STREAM_NAME": "x", "AWS_REGION": "us-east-1", "SUPER": "1"})


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("SUPERSIM_STREAM", "SUPERSIM_STREAM_NAME"),
        ("SUPERSIM_REDIS", "SUPERSIM_REDIS_URL"),
        ("SUPERSIM_ALERT__SINKS", "SUPERSIM_ALERTS__SINKS"),
        ("SUPERSIM_ALERTS__WEBHOOK__URLS", "SUPERSIM_ALERTS__WEBHOOK__URL"),
        ("SUPERSIM_ALERTS__STORM_REJECTIONS", "SUPERSIM_ALERTS__THRESHOLDS__STORM_REJECTIONS"),
        ("SUPERSIM_METERING__SESSION_RETENTION", "SUPERSIM_METERING__SESSION_RETENTION_DAYS"),
        ("supersim_log_levle", "SUPERSIM_LOG_LEVEL"),
    ],
)
def test_suggestions_follow_sections_and_nesting(variable: str, suggestion: str) -> None:
    """The suggestion is the valid name most like the unknown one, nested ones included."""
    message = refusal({variable: "1"})
    assert f"{variable}: unknown variable (did you mean {suggestion}?)" in message


def test_every_unknown_variable_is_named_in_one_error() -> None:
    """Several unknown variables are all reported at once; one without a similar name
    says so."""
    message = refusal({"SUPERSIM_HANDLER": "log", "SUPERSIM_QQQ": "1", "SUPERSIM_REGION": "x"})
    assert "SUPERSIM_HANDLER: unknown variable (did you mean SUPERSIM_HANDLERS?)" in message
    assert "SUPERSIM_QQQ: unknown variable (no similar variable)" in message
    assert "SUPERSIM_REGION" not in message


def test_nothing_is_read_below_a_field_given_whole() -> None:
    """A variable below a dict field (``SUPERSIM_ALERTS__FLEETS__HF...``) is refused: the
    field takes its whole value, as JSON, at its own name."""
    message = refusal({"SUPERSIM_ALERTS__FLEETS__HF1__STORM_REJECTIONS": "5"})
    assert "nothing is read below SUPERSIM_ALERTS__FLEETS" in message


def test_a_handler_without_settings_has_no_section() -> None:
    """The ``log`` handler declares no settings, so ``SUPERSIM_LOG__*`` is unknown."""
    assert "SUPERSIM_LOG__EVERY: unknown variable" in refusal({"SUPERSIM_LOG__EVERY": "1"})


# --- third-party handlers --------------------------------------------------------------------


def test_an_unknown_plugin_section_is_refused() -> None:
    """A section no available handler declares is unknown."""
    assert "SUPERSIM_TARIFFS__RATE: unknown variable" in refusal({"SUPERSIM_TARIFFS__RATE": "1"})


@pytest.mark.usefixtures("tariffs_entry_point")
def test_an_installed_plugin_makes_its_section_known() -> None:
    """A package's entry-point plugin that declares a settings model and section makes
    ``SUPERSIM_<SECTION>`` and its fields (nested ones too) valid, chosen or not; its
    misspellings get suggestions from its own fields."""
    registry.check_environment(TARIFF_VARIABLES)
    message = refusal({"SUPERSIM_TARIFFS__WEBHOOK__TIMOUT": "3"})
    assert "did you mean SUPERSIM_TARIFFS__WEBHOOK__TIMEOUT?" in message


def test_a_plugin_named_by_import_path_makes_its_section_known() -> None:
    """A handler named by import path in SUPERSIM_HANDLERS, or in a ``--handlers`` flag,
    adds its section."""
    registry.check_environment(
        {**TARIFF_VARIABLES, "SUPERSIM_HANDLERS": "log, test_strict_settings:plugin"}
    )
    registry.check_environment(TARIFF_VARIABLES, handlers=("test_strict_settings:plugin",))


def test_a_named_plugin_that_cannot_be_imported_says_so() -> None:
    """A named import path that fails to import is reported as such, not as unknown
    variables."""
    environ = {"SUPERSIM_HANDLERS": "no_such_package:plugin", "SUPERSIM_TARIFFS__RATE": "1"}
    assert "cannot import handler 'no_such_package:plugin'" in refusal(environ)


def test_a_broken_plugin_not_chosen_does_not_stop_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An installed entry point that fails to load is left out of the valid names unless
    it is named; the others still count."""
    broken = EntryPoint("broken", "no_such_package:plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda *, group: [broken])
    registry.check_environment({"SUPERSIM_ALERTS__SINKS": "log", "SUPERSIM_HANDLERS": "log"})
    assert "SUPERSIM_BROKEN__X: unknown variable" in refusal({"SUPERSIM_BROKEN__X": "1"})


def test_a_broken_plugin_chosen_by_name_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chosen by its entry-point name, a plugin that fails to load is reported with its
    import error, not as unknown variables for its settings."""
    broken = EntryPoint("broken", "no_such_package:plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda *, group: [broken])
    environ = {"SUPERSIM_HANDLERS": "log,broken", "SUPERSIM_BROKEN__X": "1"}
    said = refusal(environ)
    assert "cannot import handler 'broken'" in said
    assert "unknown variable" not in said


# --- Kubernetes service links ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SUPERSIM_WORKER_SERVICE_HOST", "10.96.0.12"),
        ("SUPERSIM_WORKER_SERVICE_PORT", "9400"),
        ("SUPERSIM_WORKER_SERVICE_PORT_METRICS", "9400"),
        ("SUPERSIM_WORKER_PORT", "tcp://10.96.0.12:9400"),
        ("SUPERSIM_WORKER_PORT_9400_TCP", "tcp://10.96.0.12:9400"),
        ("SUPERSIM_WORKER_PORT_9400_TCP_PROTO", "tcp"),
        ("SUPERSIM_WORKER_PORT_9400_TCP_PORT", "9400"),
        ("SUPERSIM_WORKER_PORT_9400_TCP_ADDR", "10.96.0.12"),
    ],
)
def test_kubernetes_service_links_are_not_settings(name: str, value: str) -> None:
    """The variables Kubernetes injects for a Service named ``supersim-worker`` in the
    namespace are left alone: name and value both have the service-link shape."""
    assert is_service_link(name, value)
    registry.check_environment({name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("SUPERSIM_HTTPS_PORT", "9400"), ("SUPERSIM_WORKER_SERVICE_HOST", "worker.local")],
)
def test_settings_shaped_like_service_links_are_still_checked(name: str, value: str) -> None:
    """A ``..._PORT`` holding a plain number, or a host that is not an address, is checked."""
    assert not is_service_link(name, value)
    assert f"{name}: unknown variable" in refusal({name: value})


# --- commands --------------------------------------------------------------------------------


def test_a_command_with_a_misspelt_variable_exits_2_before_doing_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``dlq list`` with a misspelt variable stops at once (no Redis reached), exit 2."""
    monkeypatch.setenv("SUPERSIM_STREAM_NAME", "events")
    monkeypatch.setenv("SUPERSIM_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("SUPERSIM_CONSUMER_GROUPS", "g")
    assert main(["dlq", "list"]) == 2
    err = capsys.readouterr().err
    assert (
        "SUPERSIM_CONSUMER_GROUPS: unknown variable (did you mean SUPERSIM_CONSUMER_GROUP?)" in err
    )
    assert "Redis" not in err


def test_commands_without_settings_are_not_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``decode`` reads no settings, so a stray variable does not stop it."""
    monkeypatch.setenv("SUPERSIM_HANDLER", "metering")
    path = tmp_path / "one.jsonl"
    path.write_bytes(b"{}\n")
    assert main(["decode", str(path)]) == 1  # the record is invalid; the command ran


def test_the_handlers_flag_adds_its_plugins_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run --handlers test_strict_settings:plugin`` makes that plugin's variables valid."""
    for name, value in TARIFF_VARIABLES.items():
        monkeypatch.setenv(name, value)
    parser = build_parser()
    check_environment(parser.parse_args(["run", "--handlers", "log,test_strict_settings:plugin"]))
    with pytest.raises(ConfigError, match="SUPERSIM_TARIFFS__RATE"):
        check_environment(parser.parse_args(["run"]))


def test_the_worker_processes_of_the_suite_set_only_settings() -> None:
    """The environment the suite's worker subprocesses run with holds settings only."""
    env = worker_env("http://127.0.0.1:1", "redis://127.0.0.1:1/0", "s", SUPERSIM_BATCH_LIMIT="10")
    registry.check_environment(env)


def test_run_with_a_misspelt_variable_exits_2_with_the_suggestion() -> None:
    """``python -m worker run`` with ``SUPERSIM_HANDLER=metering`` exits 2 at start-up,
    naming the variable and suggesting SUPERSIM_HANDLERS."""
    env = worker_env("http://127.0.0.1:1", "redis://127.0.0.1:1/0", "s")
    env["SUPERSIM_HANDLER"] = "metering"
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr.decode()[-2000:]
    stderr = result.stderr.decode()
    assert "SUPERSIM_HANDLER: unknown variable (did you mean SUPERSIM_HANDLERS?)" in stderr
    assert "Traceback" not in stderr
    assert result.stdout == b""
