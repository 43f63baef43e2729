"""The exact ground truth a consumer of the simulated stream should reproduce.

Usage: every window (``data-session.updated`` and ``data-session.ended``) is attributed to
the UTC hour and day of its ``data_session_update_end_time``. Usage describes what the
SIMs did, so it is the same for both subscriptions. ``data_limit_episodes`` describe what
the subscribed stream shows (first event carrying ``data_modifier: blocked``, first later
event without it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from worker.devtools.simulator.catalog import ENDED, STARTED, UPDATED
from worker.devtools.simulator.delivery import DeliveryStats, subscribed
from worker.devtools.simulator.emitter import Episodes, Event
from worker.devtools.simulator.options import SimulationOptions
from worker.devtools.simulator.world import World

Usage = list[int]  # [down, up]


def _usage(pair: Usage) -> dict[str, int]:
    return {"down": pair[0], "up": pair[1], "total": pair[0] + pair[1]}


def _flat(table: Mapping[str, Usage]) -> dict[str, dict[str, int]]:
    return {key: _usage(pair) for key, pair in table.items()}


def _nested(table: Mapping[str, Mapping[str, Usage]]) -> dict[str, dict[str, dict[str, int]]]:
    return {key: _flat(inner) for key, inner in table.items()}


def _by_time(item: dict[str, Any]) -> tuple[str, str]:
    return item["first"], item.get("sim_sid") or item.get("fleet_sid") or ""


def usage_and_sessions(events: list[Event]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``usage``, ``sessions``) from every generated window."""

    def table() -> defaultdict[str, Usage]:
        return defaultdict(lambda: [0, 0])

    total = [0, 0]
    per_sim, per_fleet, per_account, per_network, per_day = (table() for _ in range(5))
    per_sim_day: defaultdict[str, defaultdict[str, Usage]] = defaultdict(table)
    per_sim_hour: defaultdict[str, defaultdict[str, Usage]] = defaultdict(table)
    sessions: dict[str, dict[str, Any]] = {}
    for event in events:
        data = event.data
        if event.kind == STARTED:
            sessions[data["data_session_sid"]] = {
                "sim_sid": data["sim_sid"],
                "start": data["data_session_start_time"],
                "end": None,
                "down": 0,
                "up": 0,
                "total": 0,
            }
            continue
        if event.kind not in (UPDATED, ENDED):
            continue
        down, up = data["data_download"], data["data_upload"]
        end = data["data_session_update_end_time"]
        day, hour = end[:10], end[:13]
        sim = data["sim_sid"]
        for pair in (
            total,
            per_sim[sim],
            per_fleet[data["fleet_sid"]],
            per_account[data["account_sid"]],
            per_network[event.network.key],
            per_day[day],
            per_sim_day[sim][day],
            per_sim_hour[sim][hour],
        ):
            pair[0] += down
            pair[1] += up
        session = sessions[data["data_session_sid"]]
        session["down"] += down
        session["up"] += up
        session["total"] += down + up
        if event.kind == ENDED:
            session["end"] = data["data_session_end_time"]
    usage = {
        "fleet_total": _usage(total),
        "per_sim": _flat(per_sim),
        "per_sim_day": _nested(per_sim_day),
        "per_sim_hour": _nested(per_sim_hour),
        "per_fleet": _flat(per_fleet),
        "per_account": _flat(per_account),
        "per_network": _flat(per_network),
        "per_day": _flat(per_day),
    }
    return usage, sessions


def data_limit_episodes(events: list[Event], options: SimulationOptions) -> list[dict[str, Any]]:
    """Blocked stretches of data-limit SIMs as the subscribed stream shows them."""
    by_sim: dict[int, list[Event]] = defaultdict(list)
    for event in events:
        if event.sim.behaviour == "data_limit" and subscribed(event, options):
            by_sim[event.sim.index].append(event)
    episodes: list[dict[str, Any]] = []
    for index in sorted(by_sim):
        open_episode: dict[str, Any] | None = None
        for event in sorted(by_sim[index], key=lambda e: (e.ts, e.seq)):
            blocked = event.data.get("data_modifier") == "blocked"
            if blocked and open_episode is None:
                open_episode = {
                    "sim_sid": event.sim.sid,
                    "fleet_sid": event.sim.fleet.sid,
                    "blocked_at": event.data["timestamp"],
                    "unblocked_at": None,
                }
                episodes.append(open_episode)
            elif not blocked and open_episode is not None:
                open_episode["unblocked_at"] = event.data["timestamp"]
                open_episode = None
    episodes.sort(key=lambda item: (item["blocked_at"], item["sim_sid"]))
    return episodes


def build_truth(
    options: SimulationOptions,
    world: World,
    events: list[Event],
    episodes: Episodes,
    stats: DeliveryStats,
) -> dict[str, Any]:
    usage, sessions = usage_and_sessions(events)
    truth: dict[str, Any] = {
        "options": options.to_json(),
        "ended_only_exact": options.schema_version == 2,
        **stats.as_json(),
        "usage": usage,
        "sessions": sessions,
        "sims": {sim.sid: sim.describe() for sim in world.sims},
        "rejection_storms": sorted(episodes.rejection_storms, key=_by_time),
        "fleet_rejection_episodes": sorted(episodes.fleet_rejection_episodes, key=_by_time),
        "failure_bursts": sorted(episodes.failure_bursts, key=_by_time),
        "data_limit_episodes": data_limit_episodes(events, options),
        "attach_loops": sorted(episodes.attach_loops, key=_by_time),
    }
    return truth
