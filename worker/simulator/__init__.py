"""Reproducible Super SIM Connection Events fleet simulator (see :mod:`worker.simulate`)."""

from __future__ import annotations

from worker.simulator.core import generate, write
from worker.simulator.options import SimulationOptions

__all__ = ["SimulationOptions", "generate", "write"]
