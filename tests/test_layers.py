"""The dependency rule between the folders of ``worker/``, read from the imports with ``ast``.

Layers, from the bottom up (a layer may import its own modules and those listed):

=========  ==============================================  ==================================
layer      modules                                         may import
=========  ==============================================  ==================================
base       ``worker`` itself and ``worker/{errors,         base
           backoff,keys,logs,owned_task,metrics,
           settings,version}.py``
events     ``worker/events/``                              base
handlers   ``worker/handlers/``                            events, base
consumer   ``worker/consumer/``                            the handler API (``worker.handlers``,
                                                           ``.base``, ``.registry``), events, base
devtools   ``worker/devtools/``                            events, base
testing    ``worker/testing*``                             handlers, events, devtools, base
cli        ``worker/cli/`` and ``worker/__main__.py``      everything; devtools only lazily
=========  ==============================================  ==================================

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``. "Lazily"
means inside a function or under ``TYPE_CHECKING``, so that ``supersim-worker`` starts
without loading development tools.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[1]
PACKAGE: Final = ROOT / "worker"

BASE_MODULES: Final = frozenset(
    {"errors", "backoff", "keys", "logs", "owned_task", "metrics", "settings", "version"}
)
FOLDERS: Final = ("events", "handlers", "consumer", "devtools", "cli")
HANDLER_API: Final = frozenset(
    {"worker.handlers", "worker.handlers.base", "worker.handlers.registry"}
)
LAYERS: Final = ("base", "events", "handlers", "consumer", "devtools", "testing", "cli")
ALLOWED: Final[dict[str, frozenset[str]]] = {
    "base": frozenset({"base"}),
    "events": frozenset({"events", "base"}),
    "handlers": frozenset({"handlers", "events", "base"}),
    "consumer": frozenset({"consumer", "handlers", "events", "base"}),  # handlers: API only
    "devtools": frozenset({"devtools", "events", "base"}),
    "testing": frozenset({"testing", "handlers", "events", "devtools", "base"}),
    "cli": frozenset(LAYERS),  # devtools: lazily only
}


def layer_of(module: str) -> str | None:
    """The layer of a dotted ``worker`` module, None for one that belongs to no layer."""
    parts = module.split(".")
    if parts[0] != "worker":
        return None
    if len(parts) == 1:
        return "base"
    top = parts[1]
    if top == "__main__":
        return "cli"
    if top.startswith("testing"):
        return "testing"
    if top in FOLDERS:
        return top
    if top in BASE_MODULES and len(parts) == 2:
        return "base"
    return None


def module_name(path: Path) -> str:
    """``worker/handlers/base.py`` -> ``worker.handlers.base``; a package is its folder."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


MODULES: Final = frozenset(module_name(path) for path in source_files())


@dataclass(frozen=True, slots=True)
class Import:
    """One imported ``worker`` module, where it is imported and how."""

    target: str  # the dotted module, e.g. worker.handlers.base
    line: int
    statement: str  # e.g. "from worker.handlers import base"
    lazy: bool  # inside a function or under TYPE_CHECKING


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from, relative imports included."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(source: str, module: str, *, is_package: bool = False) -> Iterator[Import]:
    """Every import of a ``worker`` module in ``source`` (the code of ``module``).

    ``from worker.x import y`` names the submodule ``worker.x.y`` when there is one, else
    ``worker.x`` (``y`` is then a name defined in it)."""

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno, f"import {alias.name}", lazy)
        elif isinstance(node, ast.ImportFrom):
            origin = _resolve(node, module, is_package)
            names: dict[str, list[str]] = {}  # target module -> the names taken from it
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                names.setdefault(sub if sub in MODULES else origin, []).append(alias.name)
            for target, taken in names.items():
                statement = f"from {origin} import {', '.join(taken)}"
                yield Import(target, node.lineno, statement, lazy)
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            guarded = isinstance(node, ast.If) and _is_type_checking(node.test)
            # Only the body of ``if TYPE_CHECKING:`` is never run, not its ``else``.
            yield from visit(child, inner or (guarded and child in node.body))

    for found in visit(ast.parse(source), lazy=False):
        if found.target == "worker" or found.target.startswith("worker."):
            yield found


def violations(path: Path) -> list[str]:
    """The imports of one file that break the rule, as ``file:line: statement (why)``."""
    module = module_name(path)
    layer = layer_of(module)
    assert layer is not None, f"{path.relative_to(ROOT)} belongs to no layer"
    found = []
    for imp in imports_of(path.read_text(), module, is_package=path.name == "__init__.py"):
        target_layer = layer_of(imp.target)
        if target_layer is None:
            why = f"{imp.target} belongs to no layer"
        elif target_layer not in ALLOWED[layer]:
            why = f"{layer} must not import {target_layer}"
        elif layer == "consumer" and target_layer == "handlers" and imp.target not in HANDLER_API:
            why = f"consumer may import only the handler API ({', '.join(sorted(HANDLER_API))})"
        elif layer == "cli" and target_layer == "devtools" and not imp.lazy:
            why = "cli imports devtools only lazily, inside the function that needs them"
        else:
            continue
        found.append(f"{path.relative_to(ROOT)}:{imp.line}: {imp.statement} ({why})")
    return found


def test_every_module_belongs_to_a_layer() -> None:
    """Each ``worker/**/*.py`` falls in one layer: a new top-level module must be placed."""
    orphans = [str(p.relative_to(ROOT)) for p in source_files() if layer_of(module_name(p)) is None]
    assert not orphans, "modules outside every layer: " + ", ".join(orphans)


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_what_the_rule_allows(layer: str) -> None:
    """No module of the layer imports a layer (or a module) the dependency rule forbids."""
    files = [p for p in source_files() if layer_of(module_name(p)) == layer]
    assert files or layer == "testing", f"no modules found for layer {layer}"
    broken = [line for path in files for line in violations(path)]
    assert not broken, f"{layer} breaks the dependency rule:\n" + "\n".join(broken)


def test_the_reader_sees_every_kind_of_import() -> None:
    """Function-local, TYPE_CHECKING, relative and ``from package import module`` forms count."""
    source = """
from typing import TYPE_CHECKING
import worker.errors
from worker import keys, __version__
from worker.handlers import base
from . import decode
if TYPE_CHECKING:
    from worker.consumer.app import run_worker
else:
    from worker.consumer import kinesis
def f():
    from worker.devtools import local_servers
"""
    found = {(i.target, i.lazy) for i in imports_of(source, "worker.events.records")}
    assert found == {
        ("worker.errors", False),
        ("worker.keys", False),
        ("worker", False),
        ("worker.handlers.base", False),
        ("worker.events.decode", False),
        ("worker.consumer.app", True),
        ("worker.consumer.kinesis", False),
        ("worker.devtools.local_servers", True),
    }


def test_the_command_line_starts_without_dev_tools() -> None:
    """Loading ``supersim-worker`` and all its commands imports nothing from worker.devtools."""
    code = (
        "import sys, worker.cli.main\n"
        "worker.cli.main.build_parser()\n"  # every command's module and parser
        "print(sorted(m for m in sys.modules if m.startswith('worker.devtools')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip() == "[]"


def test_help_imports_no_command_module() -> None:
    """``supersim-worker --help`` lists every command without importing their modules."""
    code = (
        "import sys, contextlib, io, worker.cli.main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    worker.cli.main.main(['--help'])\n"
        "from worker.cli.commands import COMMANDS\n"
        "print(sorted(c.module for c in COMMANDS.values() if c.module in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip() == "[]"


HEAVY_STACKS: Final = ("aiobotocore", "aiohttp", "botocore", "prometheus_client")
"""The AWS and HTTP client stacks and the metrics library: only ``run`` and the commands
that talk to Kinesis or serve HTTP need them."""


@pytest.mark.parametrize(
    "argv", [["usage", "--sim", "HS00", "--stream", "layers"], ["dlq", "list"]], ids=" ".join
)
def test_short_commands_load_no_aws_http_or_metrics_stack(redis_url: str, argv: list[str]) -> None:
    """``usage`` and ``dlq list`` read Redis without importing aiobotocore, aiohttp,
    botocore or prometheus_client, nor the consumer's app."""
    code = (
        "import sys, contextlib, io, worker.cli.main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    status = worker.cli.main.main({argv!r})\n"
        f"loaded = [m for m in {(*HEAVY_STACKS, 'worker.consumer.app')!r} if m in sys.modules]\n"
        "print(status, sorted(loaded))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SUPERSIM_")},
        "SUPERSIM_REDIS_URL": redis_url,
        "SUPERSIM_STREAM_NAME": "layers",
    }
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip() == "0 []"


def test_error_classification_loads_no_client_library() -> None:
    """``worker.errors`` classifies redis, aiohttp and botocore errors without importing
    them: a command that never uses them does not load them to classify its errors."""
    code = (
        "import sys, worker.errors\n"
        "print(sorted(m for m in ('redis', 'aiohttp', 'botocore') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert result.stdout.decode().strip() == "[]"
