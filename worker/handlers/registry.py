"""Finding handlers by name: built-ins first, then the ``supersim_worker.handlers`` entry points.

A third-party package registers a handler factory (a callable taking a
``HandlerContext`` and returning a ``Handler``) in its own ``pyproject.toml``::

    [project.entry-points."supersim_worker.handlers"]
    my_handler = "my_package.module:create"

A factory can also be named directly by its import path, ``my_package.module:create``.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Final

from worker.errors import ConfigError
from worker.handlers.base import Handler, HandlerContext, HandlerFactory

ENTRY_POINT_GROUP: Final = "supersim_worker.handlers"

BUILTINS: Final = {
    "log": "worker.handlers.log:create",
    "metering": "worker.handlers.metering.handler:create",
    "rejections": "worker.handlers.alerts.rules.rejections:create",
    "data_limit": "worker.handlers.alerts.rules.data_limit:create",
    "attach_loops": "worker.handlers.alerts.rules.attach_loops:create",
}


def _load(target: str) -> HandlerFactory:
    module_name, _, attr = target.partition(":")
    factory: HandlerFactory = getattr(importlib.import_module(module_name), attr)
    return factory


def available() -> dict[str, str]:
    """Name → import target of every handler that can be chosen."""
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found.update({name: target for name, target in BUILTINS.items() if _importable(target)})
    return found


def _importable(target: str) -> bool:
    return importlib.util.find_spec(target.partition(":")[0]) is not None


def find(name: str) -> HandlerFactory:
    """A handler factory by name, or by import path ``package.module:factory``."""
    if ":" in name:
        try:
            return _load(name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"SUPERSIM_HANDLERS: cannot import handler {name!r}: {exc}") from None
    targets = available()
    target = targets.get(name)
    if target is None:
        raise ConfigError(
            f"SUPERSIM_HANDLERS: unknown handler {name!r} (allowed: {', '.join(sorted(targets))})"
        )
    return _load(target)


def build(names: Sequence[str], context: HandlerContext) -> list[Handler]:
    """Create the named handlers, in order. Unknown names fail with a ConfigError."""
    if len(set(names)) != len(names):
        raise ConfigError(f"SUPERSIM_HANDLERS: a handler is named twice in {','.join(names)}")
    return [find(name)(context) for name in names]
