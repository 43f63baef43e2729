"""Fixed reference data: event kinds, error codes, the network table, id and time formats."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from random import Random
from typing import Any

TWILIO_PREFIX = "com.twilio.iot.supersim.connection."
KORE_PREFIX = "com.kore.supersim.connection."
TWILIO_SCHEMA = "https://events-schemas.twilio.com/SuperSim.ConnectionEvent/"
KORE_SCHEMA = "https://events-schemas.korewireless.com/SuperSim.ConnectionEvent/"
TWILIO_TEST_TYPE = "com.twilio.eventstreams.test-event"
KORE_TEST_TYPE = "com.kore.eventstreams.test.event"

ACCEPTED = "attachment.accepted"
REJECTED = "attachment.rejected"
ATTACH_FAILED = "attachment.failed"
STARTED = "data-session.started"
UPDATED = "data-session.updated"
ENDED = "data-session.ended"
SESSION_FAILED = "data-session.failed"
KINDS = (ACCEPTED, REJECTED, ATTACH_FAILED, STARTED, UPDATED, ENDED, SESSION_FAILED)

ERROR_MESSAGES: dict[int, tuple[str, ...]] = {
    83700: ("Attachment Failed Due To Internal Error",),
    83701: ("Data Session Failed Due To Internal Error",),
    83702: (
        "DIAMETER_ERROR_ROAMING_NOT_ALLOWED",
        "DIAMETER_ERROR_ROAMING_NOT_ALLOWED",
        "DIAMETER_ERROR_ROAMING_NOT_ALLOWED",
        "DIAMETER_ERROR_USER_UNKNOWN",
    ),
    83703: ("Attachment Rejected Due To Rate Limiting",),
    83704: ("Attachment Rejected Due To SIM In New State",),
    83705: ("Attachment Rejected Due To SIM In Inactive State",),
}

RAT_TYPES = ("4G LTE", "LTE Cat-M", "NB-IoT", "3G", "2G")
RAT_WEIGHTS = (70, 12, 8, 6, 4)


@dataclass(frozen=True, slots=True)
class Network:
    """A visited network as it appears in ``data.network``, plus where its cells are."""

    mcc: str
    mnc: str
    friendly_name: str
    iso_country: str
    lat: float
    lon: float
    #: ``<iso>-<mcc>-<mnc>``: the ground truth's per-network key.
    key: str = field(init=False)
    sid: str = field(init=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(f"network:{self.mcc}-{self.mnc}".encode()).hexdigest()
        object.__setattr__(self, "key", f"{self.iso_country}-{self.mcc}-{self.mnc}")
        object.__setattr__(self, "sid", "HW" + digest[:32])

    def as_data(self) -> dict[str, str]:
        return {
            "mcc": self.mcc,
            "mnc": self.mnc,
            "sid": self.sid,
            "friendly_name": self.friendly_name,
            "iso_country": self.iso_country,
        }


#: Two networks per country, so a fleet can forbid one and still reach the other.
NETWORKS: tuple[Network, ...] = (
    Network("310", "260", "T-Mobile", "US", 34.05, -118.24),
    Network("310", "410", "AT&T", "US", 41.88, -87.63),
    Network("234", "15", "Vodafone UK", "GB", 51.51, -0.13),
    Network("234", "30", "EE", "GB", 53.48, -2.24),
    Network("262", "01", "Telekom DE", "DE", 52.52, 13.40),
    Network("262", "02", "Vodafone DE", "DE", 48.14, 11.58),
    Network("208", "01", "Orange FR", "FR", 48.86, 2.35),
    Network("208", "10", "SFR", "FR", 45.76, 4.84),
)
_NETWORK_DATA = {network.key: network.as_data() for network in NETWORKS}
COUNTRIES = ("US", "GB", "DE", "FR")
COUNTRY_WEIGHTS = (40, 25, 20, 15)
NETWORKS_BY_COUNTRY: dict[str, tuple[Network, ...]] = {
    country: tuple(n for n in NETWORKS if n.iso_country == country) for country in COUNTRIES
}


def network_data(network: Network) -> dict[str, str]:
    """The ``data.network`` object for ``network`` (shared; never mutate it)."""
    return _NETWORK_DATA[network.key]


def hex_sid(prefix: str, rng: Random) -> str:
    """A Twilio-style SID: two-letter prefix and 32 lowercase hex digits drawn from ``rng``."""
    return f"{prefix}{rng.getrandbits(128):032x}"


def digits(rng: Random, count: int) -> str:
    return f"{rng.randrange(10**count):0{count}d}"


def ip_address(rng: Random) -> str:
    """A carrier-grade NAT address (100.64.0.0/10), as Super SIM assigns."""
    return f"100.{rng.randrange(64, 128)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def make_location(network: Network, rng: Random) -> dict[str, Any]:
    return {
        "cell_id": str(rng.randrange(10_000, 200_000_000)),
        "lac": str(rng.randrange(100, 65_000)),
        "lat": round(network.lat + rng.uniform(-0.3, 0.3), 7),
        "lon": round(network.lon + rng.uniform(-0.3, 0.3), 7),
    }


_DAY_CACHE: dict[int, str] = {}
_CLOCK = tuple(
    f"T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}Z" for second in range(86_400)
)


def iso(ts: int) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SSZ`` (the ``data.timestamp`` format)."""
    day, second = divmod(ts, 86_400)
    date = _DAY_CACHE.get(day)
    if date is None:
        date = datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d")
        _DAY_CACHE[day] = date
    return date + _CLOCK[second]


def iso_ms(ts: int) -> str:
    """Unix seconds as ``YYYY-MM-DDTHH:MM:SS.000Z`` (the envelope ``time`` format)."""
    return iso(ts)[:-1] + ".000Z"


def next_midnight(ts: int) -> int:
    return (ts // 86_400 + 1) * 86_400
