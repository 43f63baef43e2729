"""The fleet counter's settings, read from ``SUPERSIM_FLEET_COUNTER__<FIELD>``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from worker.events.records import EventKind


class CounterSettings(BaseModel):
    """Which kinds to count, and how long a day's counts live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kinds: frozenset[EventKind] = Field(
        frozenset(EventKind),
        min_length=1,
        description='Event kinds to count, a JSON list (e.g. ["attachment.rejected"]); all by default.',
    )
    ttl_days: int = Field(
        35,
        ge=1,
        le=3660,
        description="Days a fleet's counts of one UTC day live after they last grew.",
    )
