"""One SIM's connection events, built in time order: the ``data`` objects and their windows.

Windows are the ``data-session.updated``/``ended`` usage reports: every ~6 minutes from the
session start, the ended one covering the time since the last update. Bytes look like IoT
telemetry (0-200 kB a window, some idle windows, occasional bursts) and are zero while a
data-limit SIM is blocked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from random import Random
from typing import Any

from worker.devtools.simulator.catalog import (
    ENDED,
    ERROR_MESSAGES,
    REJECTED,
    STARTED,
    TWILIO_PREFIX,
    UPDATED,
    Network,
    hex_sid,
    ip_address,
    iso,
    make_location,
    network_data,
)
from worker.devtools.simulator.options import SimulationOptions
from worker.devtools.simulator.world import Sim, rng_for

UPDATE_INTERVAL = 360
MAX_WINDOW_BYTES = 200_000


@dataclass(slots=True)
class Event:
    """One connection event before delivery: its event time, generation order and ``data``."""

    ts: int
    seq: int
    kind: str
    sim: Sim
    network: Network
    data: dict[str, Any]


@dataclass(slots=True)
class Episodes:
    """The injected or behaviour-driven episodes a consumer's alerts should find."""

    rejection_storms: list[dict[str, Any]] = field(default_factory=list)
    attach_loops: list[dict[str, Any]] = field(default_factory=list)
    failure_bursts: list[dict[str, Any]] = field(default_factory=list)
    fleet_rejection_episodes: list[dict[str, Any]] = field(default_factory=list)


class SimEmitter:
    """Builds one SIM's events, in time order, into the shared event list."""

    def __init__(
        self, sim: Sim, options: SimulationOptions, sink: list[Event], episodes: Episodes
    ) -> None:
        self.sim = sim
        self.rng: Random = rng_for(options, "timeline", sim.index)
        self.start = options.start_ts
        self.end = options.end_ts
        self.sink = sink
        self.episodes = episodes
        self.last_reject = -(10**12)
        self.block_from: dict[int, int] = {}
        if sim.behaviour == "data_limit":
            self._plan_blocks()

    def _plan_blocks(self) -> None:
        """One data-limit hit per UTC day, 20-60% into the part of the day simulated."""
        day = self.start // 86_400
        while day * 86_400 < self.end:
            lo, hi = max(self.start, day * 86_400), min(self.end, (day + 1) * 86_400)
            self.block_from[day] = lo + int(self.rng.uniform(0.2, 0.6) * (hi - lo))
            day += 1

    def blocked(self, ts: int) -> bool:
        if not self.block_from:
            return False
        since = self.block_from.get(ts // 86_400)
        return since is not None and ts >= since

    def _location(self, network: Network) -> dict[str, Any]:
        cell = self.sim.cells.get(network.key)
        if cell is None or (self.sim.roaming and self.rng.random() < 0.3):
            cell = make_location(network, self.rng)
            self.sim.cells[network.key] = cell
        return cell

    def _emit(
        self,
        ts: int,
        kind: str,
        network: Network,
        extra: dict[str, Any] | None = None,
        error: int | None = None,
        stamp: str | None = None,
    ) -> dict[str, Any]:
        sim, rng = self.sim, self.rng
        data: dict[str, Any] = {
            "event_sid": hex_sid("EZ", rng),
            "event_type": TWILIO_PREFIX + kind,
            "timestamp": stamp or iso(ts),
            "account_sid": sim.fleet.account_sid,
            "sim_sid": sim.sid,
            "sim_iccid": sim.iccid,
            "sim_unique_name": sim.unique_name,
            "fleet_sid": sim.fleet.sid,
            "imsi": sim.imsi,
        }
        if sim.imei_mode != "omitted" and rng.random() >= 0.03:
            data["imei"] = sim.imei
        data["rat_type"] = sim.rat_type
        data["network"] = network_data(network)
        draw = rng.random()
        if draw < 0.8:
            data["location"] = self._location(network)
        elif draw < 0.95:
            data["location"] = None
        if extra:
            data.update(extra)
        if self.blocked(ts):
            data["data_modifier"] = "blocked"
        if error is not None:
            data["error"] = {"code": error, "message": rng.choice(ERROR_MESSAGES[error])}
        self.sink.append(Event(ts, len(self.sink), kind, sim, network, data))
        return data

    def _window(self, start: int, end: int) -> tuple[int, int]:
        """(download, upload) bytes for one window: IoT telemetry, some idle windows,
        occasional bursts; nothing while the SIM is blocked at its data limit."""
        rng = self.rng
        draw = rng.random()
        if draw < 0.12:
            total = 0
        elif draw < 0.14:
            total = MAX_WINDOW_BYTES + int(rng.random() * 2_000_000)
        else:
            total = min(MAX_WINDOW_BYTES, int(rng.expovariate(1.0) * self.sim.intensity))
        total = total * min(end - start, UPDATE_INTERVAL) // UPDATE_INTERVAL
        down = int(total * rng.uniform(0.1, 0.5))
        if self.blocked(end):
            return 0, 0
        return down, total - down

    def session(self, t0: int, t_end: int, network: Network) -> None:
        """started, updated every ~6 minutes, ended at ``t_end`` (same UTC day as ``t0``)."""
        rng = self.rng
        common: dict[str, Any] = {
            "apn": "super",
            "ip_address": ip_address(rng),
            "data_session_sid": hex_sid("PI", rng),
            "data_session_start_time": iso(t0),
        }
        self._emit(t0, STARTED, network, common, stamp=common["data_session_start_time"])
        cum = (0, 0)
        prev = (t0, common["data_session_start_time"])
        step = UPDATE_INTERVAL + int(rng.random() * 3)
        while prev[0] + step < t_end - 5:
            now = prev[0] + step
            cum = self._usage_event(UPDATED, prev, (now, iso(now)), network, common, cum)
            prev = (now, self.sink[-1].data["timestamp"])
            step = UPDATE_INTERVAL + int(rng.random() * 3)
        self._usage_event(ENDED, prev, (t_end, iso(t_end)), network, common, cum)

    def _usage_event(
        self,
        kind: str,
        start: tuple[int, str],
        end: tuple[int, str],
        network: Network,
        common: dict[str, Any],
        cumulative: tuple[int, int],
    ) -> tuple[int, int]:
        """One window's event; ``start``/``end`` are (Unix seconds, RFC 3339) pairs."""
        down, up = self._window(start[0], end[0])
        cum_down, cum_up = cumulative[0] + down, cumulative[1] + up
        fields = dict(common)
        fields["data_session_update_start_time"] = start[1]
        fields["data_session_update_end_time"] = end[1]
        fields["data_download"] = down
        fields["data_upload"] = up
        fields["data_total"] = down + up
        if self.sim.schema >= 2:
            fields["data_session_data_download"] = cum_down
            fields["data_session_data_upload"] = cum_up
            fields["data_session_data_total"] = cum_down + cum_up
        if kind == ENDED:
            fields["data_session_end_time"] = end[1]
        self._emit(end[0], kind, network, fields, stamp=end[1])
        return cum_down, cum_up

    def reject(self, ts: int, network: Network, code: int) -> None:
        self._emit(ts, REJECTED, network, error=code)

    def _failed_session(self, ts: int) -> dict[str, Any]:
        """The data-session fields of a ``data-session.failed`` event (a session never begun)."""
        return {
            "apn": "super",
            "ip_address": ip_address(self.rng),
            "data_session_sid": hex_sid("PI", self.rng),
            "data_session_start_time": iso(ts),
        }
