"""Reproducible Super SIM Connection Events fleet simulator (see :mod:`worker.cli.simulate`)."""

from __future__ import annotations

from worker.devtools.simulator.core import generate, truth_path, write
from worker.devtools.simulator.options import SimulationOptions

__all__ = ["SimulationOptions", "generate", "truth_path", "write"]
