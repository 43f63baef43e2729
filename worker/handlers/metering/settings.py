"""The metering handler's settings (``SUPERSIM_METERING__<FIELD>``): key retention."""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MeteringSettings(BaseModel):
    """Retention of the metering keys (env ``SUPERSIM_METERING__<FIELD>``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hour_retention_days: int = Field(
        35,
        ge=1,
        le=3660,
        description="Days a UTC day of hourly buckets lives after it last gained an hour.",
    )
    day_retention_days: int = Field(
        400,
        ge=1,
        le=3660,
        description="Days a UTC month of daily buckets lives after it last gained a day; "
        "at least session_retention_days.",
    )
    session_retention_days: int = Field(
        8,
        ge=1,
        le=3660,
        description="Days a SIM's data-session records of one UTC day (and their duplicate "
        "detection) live after one last changed: at least the stream's retention plus a day "
        "(checked at start-up; the default covers Kinesis' 7-day extended retention).",
    )

    @model_validator(mode="after")
    def _days_outlive_sessions(self) -> Self:
        if self.day_retention_days < self.session_retention_days:
            raise ValueError(
                "day_retention_days must be at least session_retention_days (a late window "
                "moves bytes between daily buckets of sessions still remembered)"
            )
        return self
