"""What each SIM does over the simulated period, as connection events in event time.

Follows the Connection Events flowchart: power up, attach (accepted; now and then first
rejected on a network the Fleet forbids), start a data session seconds later, publish
``data-session.updated`` every ~6 minutes, end the session, reconnect later. No data
session crosses a UTC midnight: it ends at 23:59:59 at the latest and the device starts a
new one just after midnight, so daily usage metered from ``data-session.ended`` alone
equals daily usage metered from every window.
"""

from __future__ import annotations

from worker.devtools.simulator.catalog import (
    ACCEPTED,
    ATTACH_FAILED,
    SESSION_FAILED,
    Network,
    iso,
    next_midnight,
)
from worker.devtools.simulator.emitter import Episodes, Event, SimEmitter
from worker.devtools.simulator.options import SimulationOptions
from worker.devtools.simulator.world import World, rng_for


class SimBehaviour(SimEmitter):
    """What one SIM does over the period, by its behaviour."""

    def first_power_up(self) -> int:
        span = self.end - self.start
        if self.sim.burst is not None:
            return self.start + int(span * self.rng.uniform(0.1, 0.4))
        return self.start + self.rng.randint(0, min(1800, span // 4))

    def _durations(self) -> tuple[int, int]:
        """(session length, gap before the next attach) for this SIM's usage profile."""
        randint = self.rng.randint
        if self.sim.profile == "persistent":
            return randint(3600, 8 * 3600), randint(10, 300)
        if self.sim.profile == "periodic":
            return randint(120, 1200), randint(1200, 7200)
        return randint(600, 7200), randint(300, 3600)

    def _pick_network(self, current: Network | None) -> Network:
        sim, rng = self.sim, self.rng
        if current is None:
            return sim.home
        if sim.roaming and rng.random() < 0.5:
            options = [n for n in sim.fleet.allowed() if n != current]
            return rng.choice(options)
        return current

    def _burst(self, t: int, kind: str, network: Network, code: int) -> int:
        rng = self.rng
        count = rng.randint(12, 20)
        first = t
        for _ in range(count):
            extra = self._failed_session(t) if code == 83701 else None
            self._emit(t, kind, network, extra, code)
            last = t
            t += rng.randint(5, 15)
        self.episodes.failure_bursts.append(
            {
                "kind": kind,
                "code": code,
                "sim_sid": self.sim.sid,
                "fleet_sid": self.sim.fleet.sid,
                "first": iso(first),
                "last": iso(last),
                "count": count,
            }
        )
        return t

    def _attach(self, t: int, network: Network, first: bool) -> int:
        """Attach-phase events for one connection; returns when the device is attached."""
        sim, rng = self.sim, self.rng
        if rng.random() < 0.01:
            self._emit(t, ATTACH_FAILED, network, error=83700)
            t += rng.randint(5, 30)
        forbidden = sim.fleet.forbidden_in(network.iso_country)
        if forbidden and rng.random() < 0.08 and t - self.last_reject > 300:
            for _ in range(rng.randint(1, 2)):
                self.reject(t, rng.choice(forbidden), 83702)
                t += rng.randint(2, 10)
            self.last_reject = t
        elif rng.random() < 0.004 and t - self.last_reject > 300:
            self.reject(t, network, 83703)
            t += rng.randint(20, 60)
            self.last_reject = t
        if first or rng.random() < 0.85:
            self._emit(t, ACCEPTED, network)
        return t + rng.randint(2, 15)

    def normal(self) -> None:
        """Attach, data session, reconnect; also data-limit SIMs (blocked part of each day)."""
        rng = self.rng
        t = self.first_power_up()
        network: Network | None = None
        reattach = first = True
        while t < self.end - 300:
            if reattach or network is None:
                network = self._pick_network(network)
            if reattach:
                if first and self.sim.burst == "attachment.failed":
                    t = self._burst(t, ATTACH_FAILED, network, 83700) + rng.randint(10, 30)
                t = self._attach(t, network, first)
            if first and self.sim.burst == "data-session.failed":
                t = self._burst(t, SESSION_FAILED, network, 83701)
            elif rng.random() < 0.01:
                self._emit(t, SESSION_FAILED, network, self._failed_session(t), 83701)
                t += rng.randint(5, 20)
            duration, gap = self._durations()
            midnight = next_midnight(t)
            t_end = min(t + duration, midnight - 1, self.end - 1)
            if t_end - t >= 60:
                self.session(t, t_end, network)
            elif t_end == self.end - 1:
                break
            first = False
            if t_end == midnight - 1:
                t = midnight + rng.randint(1, 30)
                reattach = rng.random() < 0.3
            else:
                t = t_end + gap
                reattach = True

    def inactive(self) -> None:
        """Rejection storms (83704 new / 83705 inactive) across the visible networks."""
        sim, rng = self.sim, self.rng
        visible = list(sim.fleet.allowed(sim.country)) + list(sim.fleet.forbidden_in(sim.country))
        if sim.roaming:
            visible.append(rng.choice([n for n in sim.fleet.allowed() if n not in visible]))
        t = self.first_power_up()
        while True:
            count = rng.randint(15, 60)
            times = [t]
            for _ in range(count - 1):
                times.append(times[-1] + rng.randint(3, 20))
            if times[-1] >= self.end:
                return
            seen: set[str] = set()
            for ts in times:
                network = rng.choice(visible)
                seen.add(network.key)
                self.reject(ts, network, sim.reject_code)
            self.episodes.rejection_storms.append(
                {
                    "sim_sid": sim.sid,
                    "fleet_sid": sim.fleet.sid,
                    "first": iso(times[0]),
                    "last": iso(times[-1]),
                    "count": count,
                    "codes": {str(sim.reject_code): count},
                    "networks": sorted(seen),
                }
            )
            t = times[-1] + rng.randint(1800, 3 * 3600)

    def attach_loop(self) -> None:
        """Episodes of >= 8 accepted attachments 20-40 s apart, never a data session."""
        sim, rng = self.sim, self.rng
        t = self.first_power_up()
        while True:
            count = rng.randint(8, 25)
            times = [t]
            for _ in range(count - 1):
                times.append(times[-1] + rng.randint(20, 40))
            if times[-1] >= self.end:
                return
            for ts in times:
                self._emit(ts, ACCEPTED, sim.home)
            self.episodes.attach_loops.append(
                {
                    "sim_sid": sim.sid,
                    "fleet_sid": sim.fleet.sid,
                    "first": iso(times[0]),
                    "last": iso(times[-1]),
                    "count": count,
                }
            )
            t = times[-1] + rng.randint(1800, 2 * 3600)


def simulate(world: World, options: SimulationOptions) -> tuple[list[Event], Episodes]:
    """Every SIM's events (in generation order) and the episodes they contain."""
    events: list[Event] = []
    episodes = Episodes()
    emitters: dict[int, SimBehaviour] = {}
    for sim in world.sims:
        emitter = SimBehaviour(sim, options, events, episodes)
        emitters[sim.index] = emitter
        if sim.behaviour == "inactive":
            emitter.inactive()
        elif sim.behaviour == "attach_loop":
            emitter.attach_loop()
        else:
            emitter.normal()
    if world.outage is not None:
        plan = world.outage
        rng = rng_for(options, "outage-times")
        span = options.end_ts - options.start_ts
        t0 = options.start_ts + int(span * rng.uniform(0.3, 0.7))
        times = [t0 + rng.randint(0, 170) for _ in plan.sims]
        for sim, ts in zip(plan.sims, times, strict=True):
            emitters[sim.index].reject(ts, plan.network, 83702)
        episodes.fleet_rejection_episodes.append(
            {
                "fleet_sid": plan.fleet.sid,
                "network": plan.network.key,
                "network_sid": plan.network.sid,
                "code": 83702,
                "first": iso(min(times)),
                "last": iso(max(times)),
                "distinct_sims": len(plan.sims),
            }
        )
    return events, episodes
