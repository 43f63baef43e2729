"""The simulated estate: accounts, fleets with their Network Access Profiles, and SIMs.

Every identity comes from its own ``Random`` seeded with a string naming the seed and the
thing it identifies, so a SIM keeps its SIDs when other options (shares, injected
episodes) change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from random import Random
from typing import Any, Literal

from worker.devtools.simulator.catalog import (
    COUNTRIES,
    COUNTRY_WEIGHTS,
    NETWORKS,
    NETWORKS_BY_COUNTRY,
    RAT_TYPES,
    RAT_WEIGHTS,
    Network,
    digits,
    hex_sid,
)
from worker.devtools.simulator.options import OUTAGE_MIN_SIMS, SimulationOptions

Behaviour = Literal["normal", "inactive", "data_limit", "attach_loop"]
Profile = Literal["persistent", "periodic", "mixed"]
ImeiMode = Literal["value", "null", "omitted"]
Burst = Literal["attachment.failed", "data-session.failed"]

_DEVICE_KINDS = (
    "pump-controller",
    "asset-tracker",
    "smart-meter",
    "gateway",
    "env-sensor",
    "vending",
    "ev-charger",
    "cold-chain",
)
_IMSI_PREFIXES = ("732123200", "295050900", "234334300")
_TACS = ("35860084", "86751203", "35332509", "86092204", "35847631")


def rng_for(options: SimulationOptions, *names: object) -> Random:
    """An independent, reproducible stream of randomness for one named part of the run.

    ``Random(str)`` seeds from the SHA-512 of the string, so this never depends on
    ``hash()`` randomisation.
    """
    return Random("/".join(["supersim-sim", str(options.seed), *map(str, names)]))


@dataclass(frozen=True, slots=True)
class Fleet:
    index: int
    sid: str
    account_sid: str
    forbidden: frozenset[str]

    def allowed(self, country: str | None = None) -> tuple[Network, ...]:
        pool = NETWORKS if country is None else NETWORKS_BY_COUNTRY[country]
        return tuple(n for n in pool if n.key not in self.forbidden)

    def forbidden_in(self, country: str) -> tuple[Network, ...]:
        return tuple(n for n in NETWORKS_BY_COUNTRY[country] if n.key in self.forbidden)


@dataclass(slots=True)
class Sim:
    index: int
    sid: str
    iccid: str
    unique_name: str
    imsi: str
    imei: str | None
    imei_mode: ImeiMode
    fleet: Fleet
    behaviour: Behaviour
    schema: int
    rat_type: str
    country: str
    home: Network
    roaming: bool
    profile: Profile
    intensity: float
    reject_code: int
    burst: Burst | None = None
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """This SIM's entry in the ground truth's ``sims`` map."""
        return {
            "account_sid": self.fleet.account_sid,
            "behaviour": self.behaviour,
            "fleet_sid": self.fleet.sid,
            "home_network": self.home.key,
            "roaming": self.roaming,
            "schema_version": self.schema,
            "sim_unique_name": self.unique_name,
        }


@dataclass(frozen=True, slots=True)
class OutagePlan:
    fleet: Fleet
    network: Network
    sims: tuple[Sim, ...]


@dataclass(frozen=True, slots=True)
class World:
    accounts: tuple[str, ...]
    fleets: tuple[Fleet, ...]
    sims: tuple[Sim, ...]
    outage: OutagePlan | None


def build_world(options: SimulationOptions) -> World:
    """Accounts, fleets and SIMs with their behaviours; raises ValueError if the requested
    episodes cannot be placed (too few normal SIMs)."""
    accounts = tuple(hex_sid("AC", rng_for(options, "account", k)) for k in range(options.accounts))
    fleets = tuple(_fleet(options, k, accounts[k % len(accounts)]) for k in range(options.fleets))
    behaviours = _behaviours(options)
    assign = rng_for(options, "fleet-assignment")
    weights = [1.0 / (k + 1) for k in range(options.fleets)]
    sims: list[Sim] = []
    for i in range(options.sims):
        k = i if i < options.fleets else assign.choices(range(options.fleets), weights)[0]
        sims.append(_sim(options, i, fleets[k], behaviours[i]))
    normal = [sim for sim in sims if sim.behaviour == "normal"]
    if options.failure_bursts:
        if len(normal) < 2:
            raise ValueError("--failure-bursts needs at least 2 normal SIMs")
        pick = rng_for(options, "failure-bursts").sample(normal, 2)
        pick[0].burst = "attachment.failed"
        pick[1].burst = "data-session.failed"
    outage = _plan_outage(options, fleets, normal) if options.outage else None
    return World(accounts, fleets, tuple(sims), outage)


def _fleet(options: SimulationOptions, k: int, account_sid: str) -> Fleet:
    rng = rng_for(options, "fleet", k)
    sid = hex_sid("HF", rng)
    forbidden = set()
    for country in COUNTRIES:
        if rng.random() < 0.5:
            forbidden.add(rng.choice(NETWORKS_BY_COUNTRY[country]).key)
    return Fleet(k, sid, account_sid, frozenset(forbidden))


def _behaviours(options: SimulationOptions) -> list[Behaviour]:
    order = list(range(options.sims))
    rng_for(options, "behaviours").shuffle(order)
    behaviours: list[Behaviour] = ["normal"] * options.sims
    cursor = 0
    plan: tuple[tuple[Behaviour, float], ...] = (
        ("inactive", options.inactive_share),
        ("data_limit", options.data_limit_share),
        ("attach_loop", options.attach_loop_share),
    )
    for behaviour, share in plan:
        count = min(round(share * options.sims), options.sims - cursor)
        for i in order[cursor : cursor + count]:
            behaviours[i] = behaviour
        cursor += count
    return behaviours


def _sim(options: SimulationOptions, i: int, fleet: Fleet, behaviour: Behaviour) -> Sim:
    rng = rng_for(options, "sim", i)
    sid = hex_sid("HS", rng)
    iccid = "8988307" + digits(rng, 13)
    unique_name = f"{rng.choice(_DEVICE_KINDS)}-{i + 1}"
    imsi = rng.choice(_IMSI_PREFIXES) + digits(rng, 6)
    imei = _imei(rng)
    mode_draw = rng.random()
    imei_mode: ImeiMode = "value" if mode_draw < 0.75 else "null" if mode_draw < 0.9 else "omitted"
    schema_draw = rng.choice((1, 2))
    schema = schema_draw if options.schema_version == "mixed" else int(options.schema_version)
    rat_type = rng.choices(RAT_TYPES, RAT_WEIGHTS)[0]
    country = rng.choices(COUNTRIES, COUNTRY_WEIGHTS)[0]
    home = rng.choice(fleet.allowed(country))
    roaming = rng.random() < options.roaming_share
    profile: Profile = rng.choices(("persistent", "periodic", "mixed"), (40, 45, 15))[0]
    if behaviour == "data_limit":
        profile = "persistent"
    intensity = rng.uniform(2_000.0, 60_000.0)
    reject_code = rng.choice((83704, 83705))
    return Sim(
        index=i,
        sid=sid,
        iccid=iccid,
        unique_name=unique_name,
        imsi=imsi,
        imei=imei if imei_mode == "value" else None,
        imei_mode=imei_mode,
        fleet=fleet,
        behaviour=behaviour,
        schema=schema,
        rat_type=rat_type,
        country=country,
        home=home,
        roaming=roaming,
        profile=profile,
        intensity=intensity,
        reject_code=reject_code,
    )


def _imei(rng: Random) -> str:
    body = rng.choice(_TACS) + digits(rng, 6)
    total = 0
    for position, char in enumerate(reversed(body)):
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return body + str((10 - total % 10) % 10)


def _plan_outage(
    options: SimulationOptions, fleets: tuple[Fleet, ...], normal: list[Sim]
) -> OutagePlan:
    candidates = [sim for sim in normal if sim.burst is None]
    by_fleet = Counter(sim.fleet.index for sim in candidates)
    fleet_index, size = max(sorted(by_fleet.items()), key=lambda item: item[1], default=(0, 0))
    if size < OUTAGE_MIN_SIMS:
        raise ValueError(
            f"--outage needs a fleet with at least {OUTAGE_MIN_SIMS} normal SIMs; "
            f"the largest has {size}: raise --sims or lower --fleets"
        )
    fleet = fleets[fleet_index]
    members = [sim for sim in candidates if sim.fleet is fleet]
    by_country = Counter(sim.country for sim in members)
    country = max(sorted(by_country.items()), key=lambda item: item[1])[0]
    local = [sim for sim in members if sim.country == country]
    pool = local if len(local) >= OUTAGE_MIN_SIMS else members
    rng = rng_for(options, "outage")
    network = rng.choice(fleet.allowed(country))
    count = min(len(pool), max(OUTAGE_MIN_SIMS, round(len(pool) * 0.5)), 200)
    return OutagePlan(fleet, network, tuple(rng.sample(pool, count)))
