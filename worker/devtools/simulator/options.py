"""What a simulation run is asked to produce: one frozen, validated options object."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

SchemaVersion = Literal[1, 2, "mixed"]
Subscription = Literal["updated+ended", "ended-only"]

DEFAULT_START = datetime(2024, 3, 1, tzinfo=UTC)

#: Smallest fleet that can carry the injected fleet-level rejection episode.
OUTAGE_MIN_SIMS = 25
#: Shortest run that leaves room for an injected episode (bursts last up to ~5 minutes).
EPISODE_MIN_HOURS = 0.25

_SHARES = (
    "inactive_share",
    "data_limit_share",
    "attach_loop_share",
    "roaming_share",
    "duplicate_share",
    "kore_share",
    "data_as_string_share",
)


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """Everything that determines a simulated stream: the same options give the same bytes."""

    sims: int
    hours: float
    seed: int
    start: datetime = field(default=DEFAULT_START)
    inactive_share: float = 0.05
    data_limit_share: float = 0.05
    attach_loop_share: float = 0.03
    roaming_share: float = 0.2
    outage: bool = False
    failure_bursts: bool = False
    duplicate_share: float = 0.0
    shuffle_window: int = 0
    kore_share: float = 0.0
    data_as_string_share: float = 0.0
    test_events: int = 0
    schema_version: SchemaVersion = 2
    subscription: Subscription = "updated+ended"
    fleets: int = 3
    accounts: int = 1

    def __post_init__(self) -> None:
        _require(
            not isinstance(self.sims, bool) and isinstance(self.sims, int),
            "sims must be an integer",
        )
        _require(self.sims >= 1, f"sims must be at least 1, got {self.sims}")
        _require(
            isinstance(self.hours, int | float) and math.isfinite(self.hours) and self.hours > 0,
            f"hours must be a finite number > 0, got {self.hours!r}",
        )
        _require(isinstance(self.seed, int), "seed must be an integer")
        _require(
            isinstance(self.start, datetime)
            and self.start.tzinfo is not None
            and self.start.utcoffset() == timedelta(0),
            f"start must be an aware UTC datetime, got {self.start!r}",
        )
        _require(self.start.microsecond == 0, "start must be a whole second")
        for name in _SHARES:
            value = getattr(self, name)
            _require(
                isinstance(value, int | float) and 0.0 <= value <= 1.0,
                f"{name} must be a share in [0, 1], got {value!r}",
            )
        behaviour_shares = self.inactive_share + self.data_limit_share + self.attach_loop_share
        _require(
            behaviour_shares <= 1.0,
            "inactive_share + data_limit_share + attach_loop_share must not exceed 1, "
            f"got {behaviour_shares:g}",
        )
        _require(
            isinstance(self.shuffle_window, int) and self.shuffle_window >= 0,
            f"shuffle_window must be a whole number of seconds >= 0, got {self.shuffle_window!r}",
        )
        _require(
            isinstance(self.test_events, int) and self.test_events >= 0,
            f"test_events must be >= 0, got {self.test_events!r}",
        )
        _require(
            self.schema_version in (1, 2, "mixed"),
            f"schema_version must be 1, 2 or 'mixed', got {self.schema_version!r}",
        )
        _require(
            self.subscription in ("updated+ended", "ended-only"),
            f"subscription must be 'updated+ended' or 'ended-only', got {self.subscription!r}",
        )
        _require(self.fleets >= 1, f"fleets must be at least 1, got {self.fleets}")
        _require(self.accounts >= 1, f"accounts must be at least 1, got {self.accounts}")
        _require(
            self.accounts <= self.fleets,
            f"accounts ({self.accounts}) must not exceed fleets ({self.fleets}): "
            "every account owns at least one fleet",
        )
        if self.outage or self.failure_bursts:
            _require(
                self.hours >= EPISODE_MIN_HOURS,
                f"--outage and --failure-bursts need hours >= {EPISODE_MIN_HOURS}",
            )

    @property
    def start_ts(self) -> int:
        """The first second of the simulated period, as Unix seconds."""
        return int(self.start.timestamp())

    @property
    def end_ts(self) -> int:
        """The end of the simulated period (exclusive), as Unix seconds."""
        return self.start_ts + max(1, round(self.hours * 3600))

    def to_json(self) -> dict[str, Any]:
        """The options as plain JSON values (``start`` as RFC 3339 with ``Z``)."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, datetime):
                value = value.strftime("%Y-%m-%dT%H:%M:%SZ")
            out[item.name] = value
        return out


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
