"""Finding handlers by name, and reading their settings: built-ins first, then the
``supersim_worker.handlers`` entry points.

A third-party package registers a ``Plugin`` (or a bare factory: a callable taking a
``HandlerContext`` and returning a ``Handler``) in its own ``pyproject.toml``::

    [project.entry-points."supersim_worker.handlers"]
    my_handler = "my_package.module:plugin"

A plugin or factory can also be named directly by its import path,
``my_package.module:plugin``. Each handler's settings are read from
``SUPERSIM_<SECTION>__<FIELD>`` (or a whole section as JSON in ``SUPERSIM_<SECTION>``),
validated once at start-up; errors name the variable.

``check_environment`` refuses ``SUPERSIM_*`` variables that are neither the consumer's
settings nor those of a handler section that can be chosen: a plugin's variables are
known because it declares its settings model (and section).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Final

from pydantic import BaseModel, Field, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from worker.errors import ConfigError
from worker.handlers.base import Handler, HandlerContext, Plugin
from worker.settings import (
    ENV_PREFIX,
    Settings,
    explain,
    refuse_unknown,
    split_names,
    unknown_variables,
    variable_names,
)

ENTRY_POINT_GROUP: Final = "supersim_worker.handlers"

BUILTINS: Final = {
    "log": "worker.handlers.log:plugin",
    "metering": "worker.handlers.metering.handler:plugin",
    "rejections": "worker.handlers.alerts.rules.rejections:plugin",
    "data_limit": "worker.handlers.alerts.rules.data_limit:plugin",
    "attach_loops": "worker.handlers.alerts.rules.attach_loops:plugin",
}


@dataclass(frozen=True, slots=True)
class Chosen:
    """A handler chosen by name, with its plugin and its validated settings."""

    name: str
    plugin: Plugin[Any]
    settings: Any

    def create(self, redis: Any, key_prefix: str) -> Handler:
        handler = self.plugin.factory(HandlerContext(self.settings, redis, key_prefix))
        if not isinstance(handler, Handler):
            raise ConfigError(
                f"SUPERSIM_HANDLERS: {self.name!r} did not build a handler "
                "(an object with name, async handle(batch) and async close())"
            )
        return handler


def available() -> dict[str, str]:
    """Name → import target of every handler that can be chosen."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update({name: target for name, target in BUILTINS.items() if _importable(target)})
    return found


def _importable(target: str) -> bool:
    return importlib.util.find_spec(target.partition(":")[0]) is not None


def _load(name: str, target: str) -> Plugin[Any]:
    module_name, _, attr = target.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"SUPERSIM_HANDLERS: cannot import handler {name!r}: {exc}") from None
    if isinstance(found, Plugin):
        return found
    if callable(found):
        return Plugin(found)
    raise ConfigError(
        f"SUPERSIM_HANDLERS: {name!r} ({target}) is neither a Plugin nor a handler factory"
    )


def find(name: str) -> Plugin[Any]:
    """A handler's plugin by name, or by import path ``package.module:attribute``."""
    if ":" in name:
        return _load(name, name)
    targets = available()
    target = targets.get(name)
    if target is None:
        raise ConfigError(
            f"SUPERSIM_HANDLERS: unknown handler {name!r} (allowed: {', '.join(sorted(targets))})"
        )
    return _load(name, target)


def section_name(name: str, plugin: Plugin[Any]) -> str:
    """The environment section of a handler's settings: ``SUPERSIM_<this>__*``."""
    section = plugin.section_for(name.rpartition(":")[2])
    return section.lower()


class _Environment(BaseSettings):
    """How every settings section is read: the worker's prefix and nesting."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", case_sensitive=False, extra="ignore"
    )


def read_section(section: str, model: type[BaseModel]) -> BaseModel:
    """Validate one settings section from ``SUPERSIM_<SECTION>__*`` (or JSON in
    ``SUPERSIM_<SECTION>``); a ConfigError names each wrong variable."""
    fields: dict[str, Any] = {section: (model, Field(default_factory=model))}
    reader = create_model(f"Environment_{section}", __base__=_Environment, **fields)
    try:
        loaded = reader()
    except ValidationError as exc:
        raise ConfigError(explain(exc, reader)) from None
    except SettingsError as exc:
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(
            f"invalid settings in {ENV_PREFIX}{section.upper()}: {exc}{cause} "
            "(variables that hold objects or lists take JSON)"
        ) from None
    value: BaseModel = getattr(loaded, section)
    return value


def choose(
    names: Sequence[str],
    *,
    sections: Mapping[str, BaseModel] | None = None,
) -> list[Chosen]:
    """The named handlers with their settings, validated: ``sections`` given explicitly
    win over the environment (tests, embedding). Unknown names, handlers named twice and
    invalid settings fail with a ConfigError."""
    if len(set(names)) != len(names):
        raise ConfigError(f"SUPERSIM_HANDLERS: a handler is named twice in {','.join(names)}")
    given = dict(sections or {})
    read: dict[str, Any] = {}
    chosen = []
    for name in names:
        plugin = find(name)
        settings: Any = None
        if plugin.settings is not None:
            section = section_name(name, plugin)
            if section in given:
                settings = given[section]
                if not isinstance(settings, plugin.settings):
                    raise ConfigError(
                        f"settings section {section!r} for {name!r} is a "
                        f"{type(settings).__name__}, not a {plugin.settings.__name__}"
                    )
            elif section in read:
                settings = read[section]
            else:
                settings = read[section] = read_section(section, plugin.settings)
        chosen.append(Chosen(name, plugin, settings))
    return chosen


def build(
    names: Sequence[str],
    redis: Any,
    key_prefix: str,
    *,
    sections: Mapping[str, BaseModel] | None = None,
) -> list[Handler]:
    """Create the named handlers, in order, each with its settings."""
    return [item.create(redis, key_prefix) for item in choose(names, sections=sections)]


def alert_handler_names() -> list[str]:
    """Every available handler whose plugin raises alerts (for the ``alerts`` commands)."""
    names = []
    for name in sorted(available()):
        try:
            plugin = find(name)
        except ConfigError:
            continue
        if plugin.alerts:
            names.append(name)
    return names


def section_variables(section: str, model: type[BaseModel]) -> set[str]:
    """The variables of one handler section: ``SUPERSIM_<SECTION>`` (the whole section as
    JSON) and ``SUPERSIM_<SECTION>__<FIELD>[__<NESTED>...]``."""
    variable = f"{ENV_PREFIX}{section.upper()}"
    return {variable, *variable_names(model, f"{variable}__")}


def known_variables(handlers: Iterable[str] = ()) -> frozenset[str]:
    """Every valid ``SUPERSIM_*`` name (upper case): the consumer's settings, and the
    sections of every handler that can be chosen (built-ins, entry points) and of those
    named in ``handlers`` by import path. A plugin that cannot be loaded is left out
    unless it is named (then its ConfigError is raised: it could not run anyway)."""
    known = set(variable_names(Settings))
    chosen = set(handlers)
    for name in available():
        try:
            plugin = find(name)
        except ConfigError:
            if name in chosen:
                raise  # chosen: its own import error, not "unknown variable" for its settings
            continue
        known |= _plugin_variables(name, plugin)
    for name in handlers:
        if ":" in name:
            known |= _plugin_variables(name, find(name))
    return frozenset(known)


def _plugin_variables(name: str, plugin: Plugin[Any]) -> set[str]:
    if plugin.settings is None:
        return set()
    return section_variables(section_name(name, plugin), plugin.settings)


def check_environment(
    environ: Mapping[str, str] | None = None, *, handlers: Sequence[str] = ()
) -> None:
    """Refuse unknown ``SUPERSIM_*`` variables: a ConfigError names each one and the
    closest valid name. Call it once at start-up, before the settings are read.

    ``handlers`` are names given besides ``SUPERSIM_HANDLERS`` (a ``--handlers`` flag);
    handlers named by import path add their sections. Plugins are loaded only when some
    variable is not one of the consumer's own."""
    env = os.environ if environ is None else environ
    core = frozenset(variable_names(Settings))
    if not unknown_variables(env, core):
        return
    named = list(handlers)
    for variable, value in env.items():
        if variable.upper() == f"{ENV_PREFIX}HANDLERS":
            named.extend(split_names(value))
    known = known_variables(named)
    refuse_unknown(unknown_variables(env, known), known)
