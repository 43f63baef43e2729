"""docs/settings.md is generated from the settings models (``make docs``) and stays in step
with them, and the hand-written settings tables elsewhere agree with the code."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Final

import pytest
from pydantic import BaseModel, Field, SecretStr

from worker.cli import settings_doc
from worker.handlers import registry
from worker.handlers.alerts.settings import AlertSettings, Window
from worker.handlers.metering.settings import MeteringSettings
from worker.settings import Settings

ROOT: Final = Path(__file__).resolve().parents[1]
COMMITTED: Final = ROOT / "docs" / "settings.md"
# Hand-written pages that name settings (handlers.md documents third-party examples).
PAGES: Final = [ROOT / "README.md", *(ROOT / "docs" / f"{name}.md" for name in (
    "operations", "alerts", "metering", "architecture"))]  # fmt: skip


@pytest.fixture(autouse=True)
def _no_supersim_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test without SUPERSIM_ variables from the calling shell."""
    for name in list(os.environ):
        if name.upper().startswith("SUPERSIM_"):
            monkeypatch.delenv(name)


def generated_rows() -> dict[str, settings_doc.Row]:
    return {
        row.variable: row
        for section in settings_doc.sections()
        for row in settings_doc.rows(section.model, section.prefix)
    }


def test_committed_reference_equals_the_generated_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/settings.md is exactly what ``python -m worker.cli.settings_doc`` writes now."""
    fresh = tmp_path / "settings.md"
    assert settings_doc.main([str(fresh)]) == 0
    assert capsys.readouterr().out.strip() == str(fresh)
    assert COMMITTED.read_text(encoding="utf-8") == fresh.read_text(encoding="utf-8"), (
        f"docs/settings.md differs from the settings models: run `{settings_doc.COMMAND}` "
        "and commit the result"
    )


def test_generation_is_deterministic() -> None:
    """Two renders in one process give the same text (no set order, time or environment)."""
    assert settings_doc.render() == settings_doc.render()


def test_sections_are_the_core_then_each_builtin_handler_section() -> None:
    """The consumer's settings first, then metering and the alert rules' shared section."""
    found = [(s.prefix, s.model, s.readers) for s in settings_doc.sections()]
    assert found == [
        ("SUPERSIM_", Settings, ()),
        ("SUPERSIM_METERING__", MeteringSettings, ("metering",)),
        ("SUPERSIM_ALERTS__", AlertSettings, ("rejections", "data_limit", "attach_loops")),
    ]


def test_every_field_is_a_row_with_nested_models_flattened() -> None:
    """Each leaf field has one row under its full variable name; nested models have none."""
    rows = generated_rows()
    expected = {f"SUPERSIM_{name.upper()}" for name in Settings.model_fields}
    expected |= {f"SUPERSIM_METERING__{name.upper()}" for name in MeteringSettings.model_fields}
    for name, field in AlertSettings.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            expected |= {
                f"SUPERSIM_ALERTS__{name.upper()}__{inner.upper()}" for inner in nested.model_fields
            }
        else:
            expected.add(f"SUPERSIM_ALERTS__{name.upper()}")
    assert set(rows) == expected
    assert "SUPERSIM_ALERTS__WEBHOOK__URL" in rows
    assert "SUPERSIM_ALERTS__THRESHOLDS__STORM_WINDOW" in rows
    assert all(row.description for row in rows.values())


def test_flattened_names_are_the_variables_the_settings_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The nested variable names the reference gives are the ones the registry reads."""
    monkeypatch.setenv("SUPERSIM_ALERTS__WEBHOOK__URL", "https://hooks.example.com/a")
    monkeypatch.setenv("SUPERSIM_ALERTS__THRESHOLDS__STORM_WINDOW", "PT7M")
    alerts = registry.read_section("alerts", AlertSettings)
    assert isinstance(alerts, AlertSettings)
    assert alerts.webhook.url == "https://hooks.example.com/a"
    assert alerts.thresholds.storm_window == timedelta(minutes=7)


class Colour(StrEnum):
    RED = "red"
    BLUE = "blue"


class Inner(BaseModel):
    """Nested things."""

    depth: int = Field(2, ge=1, le=9, description="How deep.")


class Sample(BaseModel):
    """A model with one field of each kind the reference renders."""

    wait: Window = Field(timedelta(minutes=5), description="A window.")
    short: timedelta = Field(timedelta(seconds=0.5), description="Short.")
    secret: SecretStr = Field(SecretStr("hunter2"), description="A password.")
    colour: Colour = Field(Colour.BLUE, description="A colour.")
    maybe: str | None = Field(None, description="Optional text.")
    names: tuple[str, ...] = Field(("a", "b"), description="Names.")
    codes: frozenset[int] = Field(frozenset({3, 1, 2}), description="Codes.")
    flag: bool = Field(False, description="A flag.")
    inner: Inner = Field(default_factory=Inner)


def test_cells_are_rendered_readably() -> None:
    """Durations in seconds, secrets hidden, enums by value, None as unset, lists joined,
    bounds from the constraints, nested fields under their full name."""
    rows = {row.variable: row for row in settings_doc.rows(Sample, "X_")}
    assert list(rows) == [
        "X_WAIT",
        "X_SHORT",
        "X_SECRET",
        "X_COLOUR",
        "X_MAYBE",
        "X_NAMES",
        "X_CODES",
        "X_FLAG",
        "X_INNER__DEPTH",
    ]
    cells = {name: (row.type, row.default, row.constraints) for name, row in rows.items()}
    assert cells["X_WAIT"] == ("duration", "`300` s (5 min)", "> 0")
    assert cells["X_SHORT"] == ("duration", "`0.5` s", "")
    assert cells["X_SECRET"] == ("string (secret)", "hidden", "")
    assert not any("hunter2" in cell for row in rows.values() for cell in cells[row.variable])
    assert cells["X_COLOUR"] == ("one of `red`, `blue`", "`blue`", "")
    assert cells["X_MAYBE"] == ("string", "unset", "")
    assert cells["X_NAMES"] == ("list", "`a,b`", "")
    assert cells["X_CODES"] == ("list of integers", "`1,2,3`", "")
    assert cells["X_FLAG"] == ("boolean", "`false`", "")
    assert cells["X_INNER__DEPTH"] == ("integer", "`2`", "1\N{EN DASH}9")


def test_core_float_durations_are_typed_as_seconds() -> None:
    """The consumer's intervals and timeouts show as seconds, their defaults without .0."""
    row = generated_rows()["SUPERSIM_SHUTDOWN_TIMEOUT"]
    assert (row.type, row.default, row.constraints) == ("seconds", "`20`", "> 0")


def test_a_field_without_description_stops_the_generation() -> None:
    """A new setting must be described: the reference is built from the descriptions."""

    class Undescribed(BaseModel):
        count: int = 1

    with pytest.raises(ValueError, match=r"Undescribed\.count"):
        list(settings_doc.rows(Undescribed, "X_"))


def test_a_type_it_cannot_name_stops_the_generation() -> None:
    """An unknown field type fails loudly rather than printing a Python repr."""

    class Odd(BaseModel):
        path: Path = Field(Path("/"), description="A path.")

    with pytest.raises(TypeError, match="type_text"):
        list(settings_doc.rows(Odd, "X_"))


# --- the hand-written pages agree with the code ------------------------------------------

VARIABLE: Final = re.compile(r"SUPERSIM_[A-Z0-9_]+")


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_variable_a_page_names_exists(path: Path) -> None:
    """README and the docs name only real variables (or a section's prefix)."""
    rows = generated_rows()
    sections = {section.prefix for section in settings_doc.sections()}
    for name in set(VARIABLE.findall(path.read_text(encoding="utf-8"))):
        known = (
            name in rows
            or f"{name}__" in sections
            or (name.endswith("__") and any(v.startswith(name) for v in rows))
        )
        assert known, f"{path.relative_to(ROOT)} names {name}, which no settings model reads"


UNITS: Final = {"s": 1, "min": 60, "h": 3600, "day": 86400, "days": 86400}
DEFAULT_CELL: Final = re.compile(r"^`([^`]*)`(?: (s|min|h|days?))?$")


def _table_defaults(text: str) -> dict[str, str]:
    """Variable -> default, from ``| `VAR` / `__OTHER` | `1` s / `2` | ... |`` rows."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("| `SUPERSIM_"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        names = [name.strip().strip("`") for name in cells[0].split(" / ")]
        defaults = [value.strip() for value in cells[1].split(" / ")]
        first = names[0]
        parent = first.rsplit("__", 1)[0] if "__" in first else "SUPERSIM"
        full = [first] + [parent + name if name.startswith("__") else name for name in names[1:]]
        if len(defaults) == 1:
            defaults *= len(full)
        found.update(zip(full, defaults, strict=True))
    return found


def _value(cell: str) -> str | float | None:
    """A default cell as a comparable value (seconds for durations), None when not simple."""
    if cell in ("unset", "hidden", "empty"):
        return cell
    match = DEFAULT_CELL.match(cell.split(" (")[0] if cell.startswith("`") else cell)
    if not match:
        return None
    value, unit = match.groups()
    try:
        return float(value) * UNITS[unit or "s"]
    except ValueError:
        return value


@pytest.mark.parametrize(
    "path", [p for p in PAGES if p.name != "architecture.md"], ids=lambda p: p.name
)
def test_hand_written_settings_tables_give_the_code_defaults(path: Path) -> None:
    """Each settings table row of README, operations, alerts and metering has the default
    the code has (numbers compared as numbers, durations in seconds)."""
    rows = generated_rows()
    table = _table_defaults(path.read_text(encoding="utf-8"))
    assert table, f"no settings table found in {path.name}"
    checked = 0
    for name, cell in table.items():
        written, generated = _value(cell), _value(rows[name].default)
        if written is None or generated in (None, "hidden"):
            continue  # prose such as "(required)", or a secret the reference hides
        checked += 1
        assert written == generated, f"{path.name}: {name} default {cell}, code {generated}"
    assert checked, f"no default could be checked in {path.name}"


def test_the_redis_url_default_the_pages_give_is_the_code_default() -> None:
    """The reference hides secret defaults, so the Redis URL's is checked against the model."""
    default = Settings.model_fields["redis_url"].default
    assert isinstance(default, SecretStr)
    for path in PAGES[:2]:  # README and operations
        cell = _table_defaults(path.read_text(encoding="utf-8"))["SUPERSIM_REDIS_URL"]
        assert cell == f"`{default.get_secret_value()}`", f"{path.name}: {cell}"
