"""``python -m worker.cli.settings_doc docs/settings.md``: the settings reference, generated.

One Markdown table per settings section: the consumer's ``Settings`` (``SUPERSIM_<FIELD>``),
then each section a built-in handler's plugin declares (``SUPERSIM_<SECTION>__<FIELD>``),
nested models flattened to their full variable name. Every row comes from the field: its
type, default, constraints and description, so the code is the one place to change.
``make docs`` runs it; ``tests/test_settings_doc.py`` fails when the committed file differs
from what the code generates, as ``make schemas`` and ``tests/test_schemas.py`` do for
``schemas/``.

It lives in ``cli`` because it reads the core settings and the handlers' plugins, and only
the command-line layer may import both (``devtools`` sees events and base only; see
``tests/test_layers.py``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Final, Union, get_args, get_origin

import annotated_types
from pydantic import AwareDatetime, BaseModel, SecretStr
from pydantic.fields import FieldInfo

from worker.handlers import registry
from worker.settings import ENV_PREFIX, Settings

DEFAULT_PATH: Final = Path("docs/settings.md")
COMMAND: Final = "make docs"
"""What to run when the committed reference has drifted from the code."""

EN_DASH: Final = "\N{EN DASH}"
DURATION_UNITS: Final = ((86_400, "day", "days"), (3_600, "h", "h"), (60, "min", "min"))

INTRO: Final = f"""\
# Settings reference

<!-- Generated from the settings models by `{COMMAND}` (python -m worker.cli.settings_doc
docs/settings.md): do not edit by hand; change the field descriptions and regenerate. -->

Every setting is an environment variable (names are case-insensitive), read once at
start-up; an invalid value stops the worker with a message naming the variable and what it
accepts. A handler's section is read only when `SUPERSIM_HANDLERS` names a handler that
reads it, and can also be given whole as JSON in `SUPERSIM_<SECTION>`.

- **seconds**: a number of seconds (`0.5`, `30`).
- **duration**: seconds (`300`, `0.5`) or ISO 8601 (`PT5M`).
- **list**: comma-separated values (`a,b`).
- **JSON object**: a JSON document in the variable.
- A default of **unset** means the variable is not set; a **hidden** one is a secret.
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One environment variable of the reference."""

    variable: str
    type: str
    default: str
    constraints: str
    description: str


@dataclass(frozen=True, slots=True)
class Section:
    """One settings model and the prefix its variables are read under."""

    prefix: str
    """``SUPERSIM_`` for the consumer, ``SUPERSIM_<SECTION>__`` for a handler section."""
    model: type[BaseModel]
    readers: tuple[str, ...]
    """The built-in handlers that read it; empty for the consumer's settings."""


def sections() -> list[Section]:
    """The consumer's settings, then each built-in handler section in ``BUILTINS`` order
    (handlers sharing a section, like the alert rules, give it once)."""
    models: dict[str, type[BaseModel]] = {}
    readers: dict[str, list[str]] = {}
    for name in registry.BUILTINS:
        plugin = registry.find(name)
        model = plugin.settings
        if model is None:
            continue
        section = registry.section_name(name, plugin)
        if models.setdefault(section, model) is not model:
            raise TypeError(
                f"handlers {readers[section]} and {name!r} share section {section!r} "
                "with different settings models"
            )
        readers.setdefault(section, []).append(name)
    return [
        Section(ENV_PREFIX, Settings, ()),
        *(
            Section(f"{ENV_PREFIX}{section.upper()}__", model, tuple(readers[section]))
            for section, model in models.items()
        ),
    ]


def rows(model: type[BaseModel], prefix: str) -> Iterator[Row]:
    """A row per variable of ``model``, in field order; nested models are flattened into
    ``<prefix><FIELD>__<NESTED FIELD>``."""
    for name, field in model.model_fields.items():
        variable = prefix + name.upper()
        inner, _, metadata = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            yield from rows(inner, variable + "__")
            continue
        if not field.description:
            raise ValueError(f"{model.__name__}.{name} ({variable}) has no description")
        yield Row(
            variable=variable,
            type=type_text(inner, field),
            default=default_text(field),
            constraints=constraints_text([*field.metadata, *metadata]),
            description=field.description,
        )


def nested_models(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, type[BaseModel]]]:
    """``(variable prefix, model)`` of every nested model, depth first."""
    for name, field in model.model_fields.items():
        inner, _, _ = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            nested = f"{prefix}{name.upper()}__"
            yield nested, inner
            yield from nested_models(inner, nested)


def _unwrap(annotation: Any) -> tuple[Any, bool, list[Any]]:
    """``(type, nullable, Annotated metadata)`` of ``X``, ``X | None`` or
    ``Annotated[X, ...] | None``."""
    nullable = False
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            annotation, nullable = rest[0], True
    metadata: list[Any] = []
    if get_origin(annotation) is Annotated:
        annotation, *metadata = get_args(annotation)
    return annotation, nullable, metadata


# --- the cells ---------------------------------------------------------------------------


def type_text(annotation: Any, field: FieldInfo) -> str:
    """A reader's name for the type: seconds, duration, integer, list, one of the choices."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and extra.get("unit") == "seconds":
        return "seconds"
    origin = get_origin(annotation)
    if origin in (tuple, list, set, frozenset):
        items = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        return "list of integers" if items == [int] else "list"
    if origin is dict:
        return "JSON object"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "one of " + ", ".join(f"`{member.value}`" for member in annotation)
    simple: dict[Any, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        SecretStr: "string (secret)",
        timedelta: "duration",
        datetime: "RFC 3339 time",
        AwareDatetime: "RFC 3339 time",
    }
    if annotation in simple:
        return simple[annotation]
    raise TypeError(f"no readable name for the type {annotation!r}: add one to type_text")


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in the variable: enums by value, durations in
    seconds, lists comma-separated; None is ``unset``, a secret ``hidden``."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "hidden"
    if value == "":
        return "empty"
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        human = _human_duration(seconds)
        return f"`{_number(seconds)}` s" + (f" ({human})" if human else "")
    return f"`{_literal(value)}`"


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, frozenset | set):
        return ",".join(_literal(item) for item in sorted(value))
    if isinstance(value, tuple | list):
        return ",".join(_literal(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _number(value: float) -> str:
    """``20.0`` as ``20``, ``0.5`` as ``0.5``, ``100000`` as ``100000``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _human_duration(seconds: float) -> str:
    """``300`` as ``5 min``, ``86400`` as ``1 day``; empty below a minute or when uneven
    (the default is given in seconds anyway)."""
    for size, one, many in DURATION_UNITS:
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {one if count == 1 else many}"
    return ""


def constraints_text(metadata: Sequence[Any]) -> str:
    """Bounds (a range such as 1 to 10000, ``≥ 3``, ``> 0``), length and pattern, from the
    field's metadata."""
    bounds: dict[str, Any] = {}
    parts: list[str] = []
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            bounds["ge"] = item.ge
        elif isinstance(item, annotated_types.Gt):
            bounds["gt"] = item.gt
        elif isinstance(item, annotated_types.Le):
            bounds["le"] = item.le
        elif isinstance(item, annotated_types.Lt):
            bounds["lt"] = item.lt
        elif isinstance(item, annotated_types.MinLen):
            parts.append("not empty" if item.min_length == 1 else f"≥ {item.min_length} chars")
        elif isinstance(item, annotated_types.MaxLen):
            parts.append(f"≤ {item.max_length} chars")
        elif getattr(item, "pattern", None):
            parts.append(f"matches `{item.pattern}`")
    if "ge" in bounds and "le" in bounds:
        ranged = [f"{_bound(bounds.pop('ge'))}{EN_DASH}{_bound(bounds.pop('le'))}"]
    else:
        ranged = []
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    ranged += [f"{symbols[key]} {_bound(value)}" for key, value in bounds.items()]
    return ", ".join(ranged + parts)


def _bound(value: Any) -> str:
    if isinstance(value, timedelta):
        return _number(value.total_seconds())
    return _number(value)


# --- the document ------------------------------------------------------------------------


def _docstring(model: type[BaseModel]) -> str:
    """The first paragraph of a model's docstring, reST literals as Markdown code."""
    text = inspect.cleandoc(model.__doc__ or "").split("\n\n", 1)[0]
    return re.sub(r"``(.+?)``", r"`\1`", " ".join(text.split()))


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_section(section: Section) -> str:
    about = _docstring(section.model)
    if section.readers:
        names = [f"`{name}`" for name in section.readers]
        either = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        about += f" Read when `SUPERSIM_HANDLERS` names {either}."
    lines = [f"## `{section.prefix}`", "", about, ""]
    nested = list(nested_models(section.model, section.prefix))
    lines += [f"- `{prefix}*`: {_docstring(model)}" for prefix, model in nested]
    if nested:
        lines.append("")
    lines += [
        "| variable | type | default | constraints | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows(section.model, section.prefix):
        cells = (f"`{row.variable}`", row.type, row.default, row.constraints, row.description)
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole reference (deterministic: the same code gives the same bytes)."""
    return "\n".join([INTRO, *(render_section(section) for section in sections())])


def write(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.cli.settings_doc",
        description="Write the settings reference (Markdown) generated from the settings models.",
    )
    parser.add_argument("output", type=Path, nargs="?", default=DEFAULT_PATH)
    print(write(parser.parse_args(argv).output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
