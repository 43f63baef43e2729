"""Names of metering's Redis keys, shared by the handler that writes them and by ``usage``,
which reads them without loading the handler (or the event models)."""

from __future__ import annotations

from typing import Final

DIMENSIONS: Final = {"sim": "s", "fleet": "f", "account": "a", "network": "n"}
"""Dimension name -> its letter in bucket keys."""


def hourly_key(prefix: str, dimension: str, ident: str, day: str) -> str:
    """Hash of one UTC day (``YYYYMMDD``) of hourly buckets."""
    return f"{prefix}:m:h:{DIMENSIONS[dimension]}:{ident}:{day}"


def daily_key(prefix: str, dimension: str, ident: str, month: str) -> str:
    """Hash of one UTC month (``YYYYMM``) of daily buckets."""
    return f"{prefix}:m:d:{DIMENSIONS[dimension]}:{ident}:{month}"


def sessions_key(prefix: str, sim_sid: str, day: str) -> str:
    """Hash of the sessions of one SIM that started on one UTC day (``YYYYMMDD``)."""
    return f"{prefix}:m:r:{sim_sid}:{day}"


def legacy_sessions_key(prefix: str, sim_sid: str, day: str) -> str:
    """The same hash in the previous layout (read, and emptied as its sessions change)."""
    return f"{prefix}:m:s:{sim_sid}:{day}"
