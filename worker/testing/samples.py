"""The reference data the builders of ``worker.testing.events`` start from: the real
``data-session.updated`` sample's SIM, network, location and data session, the envelope
formats of both vendors, and the documented error codes."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

KINDS: Final = (
    "attachment.accepted",
    "attachment.rejected",
    "attachment.failed",
    "data-session.started",
    "data-session.updated",
    "data-session.ended",
    "data-session.failed",
)
VENDORS: Final = ("twilio", "kore")
USAGE_KINDS: Final = ("data-session.updated", "data-session.ended")
SESSION_KINDS: Final = ("data-session.started", *USAGE_KINDS)
"""The kinds that belong to a data session (``data-session.failed`` never started one)."""

TWILIO_PREFIX: Final = "com.twilio.iot.supersim.connection."
KORE_PREFIX: Final = "com.kore.supersim.connection."
TWILIO_SCHEMA: Final = "https://events-schemas.twilio.com/SuperSim.ConnectionEvent/"
KORE_SCHEMA: Final = "https://events-schemas.korewireless.com/SuperSim.ConnectionEvent/"
ENVELOPE_KEYS: Final = frozenset(
    {"specversion", "type", "source", "id", "dataschema", "datacontenttype", "time", "data"}
)
CUMULATIVE_FIELDS: Final = (
    "data_session_data_download",
    "data_session_data_upload",
    "data_session_data_total",
)

# The real sample's identifiers (as found in a public integration's test data).
SAMPLE_EVENT_SID: Final = "EZeb42ec296e094786c6dd34aab7b15fac"
SIM: Final[Mapping[str, Any]] = {
    "account_sid": "ACe7ea554f7fc0fad65e689bb5899bb6c3",
    "sim_sid": "HS2f71995b834d803ff5376799ba59bd1d",
    "sim_iccid": "89883070000005381783",
    "sim_unique_name": "Zeblaze Thor 6 Android Watch",
    "fleet_sid": "HF925ae5b4af6aeb7d5034d3f4b09c78ce",
    "imsi": "732123200563187",
    "imei": "358600842867678",
    "rat_type": "4G LTE",
}
NETWORK: Final[Mapping[str, Any]] = {
    "iso_country": "US",
    "mnc": "260",
    "mcc": "310",
    "sid": "HWd46933be78a54c05b5c287ddeb9592f4",
    "friendly_name": "T-Mobile",
}
LOCATION: Final[Mapping[str, Any]] = {
    "lon": -118.5720773,
    "cell_id": "47322374",
    "lat": 34.166991,
    "lac": "15170",
}
SESSION: Final[Mapping[str, Any]] = {
    "apn": "super",
    "ip_address": "100.68.56.159",
    "data_session_sid": "PIc64fc7780f12ab694aad316d7b06f7a3",
    "data_session_start_time": "2022-12-11T06:15:01Z",
}
TIMESTAMP: Final = "2022-12-14T13:40:52Z"
UPDATE_START: Final = "2022-12-14T13:34:52Z"
UPDATE_INTERVAL: Final = timedelta(minutes=6)
"""How often a connected SIM reports a usage window."""

ERROR_MESSAGES: Final[Mapping[int, str]] = {
    83700: "Attachment Failed Due To Internal Error",
    83701: "Data Session Establishment Failed Due To Internal Error",
    83702: "DIAMETER_ERROR_ROAMING_NOT_ALLOWED",
    83703: "Attachment Rejected Due To Rate Limiting",
    83704: "Attachment Rejected Due To SIM In New State",
    83705: "Attachment Rejected Due To SIM In Inactive State",
}
"""The error codes documented for these events; the messages are illustrative."""
ERRORS: Final[Mapping[str, Mapping[str, Any]]] = {
    "attachment.rejected": {"code": 83705, "message": ERROR_MESSAGES[83705]},
    "attachment.failed": {"code": 83700, "message": ERROR_MESSAGES[83700]},
    "data-session.failed": {"code": 83701, "message": ERROR_MESSAGES[83701]},
}
# Per-window and cumulative byte counts of the updated/ended events (the sample's are 0).
USAGE: Final[Mapping[str, Mapping[str, int]]] = {
    "data-session.updated": {
        "data_download": 0,
        "data_upload": 0,
        "data_total": 0,
        "data_session_data_download": 0,
        "data_session_data_upload": 0,
        "data_session_data_total": 0,
    },
    "data-session.ended": {
        "data_download": 120_034,
        "data_upload": 8_761,
        "data_total": 128_795,
        "data_session_data_download": 5_230_112,
        "data_session_data_upload": 401_227,
        "data_session_data_total": 5_631_339,
    },
}
