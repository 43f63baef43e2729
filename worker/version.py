"""The installed version of the worker, for ``--version``, every log line and the
``supersim_build_info`` metric. Imports nothing but ``importlib.metadata``, so
``supersim-worker --version`` loads none of the worker's libraries."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Final

DISTRIBUTION: Final = "supersim-worker"


def package_version() -> str:
    """The installed version of ``supersim-worker`` (``unknown`` when run from a source
    tree that was never installed)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
