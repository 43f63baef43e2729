"""A supersim-worker handler: distinct connection events per fleet, kind and UTC day."""

from supersim_fleet_counter.handler import FleetCounter, count, plugin
from supersim_fleet_counter.settings import CounterSettings

__all__ = ["CounterSettings", "FleetCounter", "count", "plugin"]
