"""Alert settings: sinks, webhook delivery, event-time limits and detection thresholds.

The alert rules' shared settings section: read once at start-up by the handler registry
from ``SUPERSIM_ALERTS__<FIELD>`` (nested ones with a further ``__``, e.g.
``SUPERSIM_ALERTS__WEBHOOK__URL``) and handed to each rule's handler. Durations accept seconds (``300``) or ISO 8601
(``PT5M``). ``sinks`` accepts a comma-separated list. Per-fleet threshold overrides are a
JSON object: ``SUPERSIM_ALERTS__FLEETS='{"HF...": {"storm_rejections": 5}}'``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode

from worker.handlers.alerts.sinks import available_sinks


def _seconds(value: Any) -> Any:
    """Accept a number of seconds given as a string (environment variables are strings)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Seconds = Annotated[timedelta, BeforeValidator(_seconds)]
"""A duration: seconds as a number or numeric string, or ISO 8601 (``PT5M``)."""
Window = Annotated[timedelta, BeforeValidator(_seconds), Field(gt=timedelta(0))]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Thresholds(_Frozen):
    """Detection thresholds, all in event time. Every field can be overridden per fleet."""

    storm_rejections: int = Field(
        10, ge=1, description="attachment.rejected events of one SIM that open a storm."
    )
    storm_window: Window = Field(
        timedelta(minutes=5), description="Window of a storm; also how long it stays quiet."
    )
    fleet_sims: int = Field(
        20, ge=1, description="Distinct SIMs rejected on one network that open a fleet alert."
    )
    fleet_window: Window = Field(timedelta(minutes=5), description="Window of a fleet alert.")
    attachment_failures: int = Field(
        10, ge=1, description="attachment.failed events of one SIM that open a burst."
    )
    data_session_failures: int = Field(
        10, ge=1, description="data-session.failed events of one SIM that open a burst."
    )
    failure_window: Window = Field(timedelta(minutes=5), description="Window of failure bursts.")
    attach_loop_accepts: int = Field(
        5, ge=2, description="attachment.accepted events with no data session that open a loop."
    )
    attach_loop_window: Window = Field(timedelta(minutes=5), description="Window of attach loops.")


class ThresholdOverrides(_Frozen):
    """Per-fleet overrides: unset fields keep the global value."""

    storm_rejections: int | None = Field(None, ge=1)
    storm_window: Window | None = None
    fleet_sims: int | None = Field(None, ge=1)
    fleet_window: Window | None = None
    attachment_failures: int | None = Field(None, ge=1)
    data_session_failures: int | None = Field(None, ge=1)
    failure_window: Window | None = None
    attach_loop_accepts: int | None = Field(None, ge=2)
    attach_loop_window: Window | None = None


class WebhookSettings(_Frozen):
    """The webhook sink: a signed JSON POST per alert, retried on 5xx and timeouts."""

    url: str | None = Field(None, description="Where alerts are POSTed (http:// or https://).")
    secret: SecretStr | None = Field(None, description="HMAC-SHA256 key for the signature header.")
    timeout: Seconds = Field(timedelta(seconds=5), description="Timeout of one POST.")
    attempts: int = Field(3, ge=1, le=10, description="POSTs per delivery round.")
    backoff_base: Seconds = Field(
        timedelta(seconds=0.5), description="First backoff between POSTs of a round (jittered)."
    )
    backoff_cap: Seconds = Field(timedelta(seconds=5), description="Longest backoff in a round.")
    retry_base: Seconds = Field(
        timedelta(seconds=30), description="Wait before the first later round of a failed alert."
    )
    retry_cap: Seconds = Field(timedelta(minutes=15), description="Longest wait between rounds.")
    max_age: Seconds = Field(
        timedelta(hours=24), description="A pending alert older than this is dead-lettered."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @property
    def round_seconds(self) -> float:
        """Longest time one delivery round can take (all attempts and their backoffs)."""
        per_try = self.timeout.total_seconds() + self.backoff_cap.total_seconds()
        return self.attempts * per_try


class AlertSettings(_Frozen):
    """Everything the alert handlers (``rejections``, ``data_limit``, ``attach_loops``) read."""

    sinks: Annotated[tuple[str, ...], NoDecode] = Field(
        ("log",),
        description="Comma-separated sinks (log, stream, webhook, or one a package "
        "registers); log is always included.",
    )
    stream_key: str = Field(
        "alerts", min_length=1, description="Redis stream of alerts, under the key prefix."
    )
    stream_maxlen: int = Field(100_000, ge=100, description="Approximate cap of that stream.")
    dead_maxlen: int = Field(
        10_000,
        ge=1,
        description="Most undeliverable alerts kept per handler; beyond it they stay pending "
        "and are tried again (never dropped).",
    )
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    stale_after: Seconds | None = Field(
        timedelta(hours=1),
        description="Episodes whose newest event is older than this (wall clock) are "
        "recorded but not sent (a backfill's old episodes); set it empty to send everything.",
    )
    quiet_grace: Seconds = Field(
        timedelta(minutes=1),
        description="How far out of order a shard may deliver events: episodes open, grow "
        "and close once event time has passed their events by this much.",
    )
    upstream_delay: Seconds = Field(
        timedelta(minutes=2),
        description="How far behind the wall clock events may still arrive while the "
        "consumer is caught up (delay in Event Streams and the Kinesis sink): event time "
        "then is the wall clock minus this, so alerts open and close this much later.",
    )
    max_lateness: Seconds = Field(
        timedelta(minutes=30),
        description="How long past event time hits are kept, so that a late event (or one "
        "from a shard behind the others) still counts with the hits around it.",
    )
    shard_warmup: Seconds = Field(
        timedelta(seconds=30),
        description="After a start, how long (wall clock) every shard gets to deliver a first "
        "batch before event time may close episodes.",
    )
    shard_idle: Seconds = Field(
        timedelta(minutes=10),
        description="A shard that delivered no batch for this long (wall clock) stops "
        "holding event time back.",
    )
    retention: Seconds = Field(
        timedelta(days=8),
        description="How long a closed episode's state outlives its last event (open ones are kept).",
    )
    fleet_ignore_codes: Annotated[frozenset[int], NoDecode] = Field(
        frozenset({83704, 83705}),
        description="Rejection codes not counted for fleet alerts (SIM state, not network): "
        "comma-separated, or a JSON list.",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds)
    fleets: Annotated[dict[str, ThresholdOverrides], NoDecode] = Field(
        default_factory=dict,
        description="Per-fleet threshold overrides, a JSON object: fleet SID -> the thresholds "
        'to change, e.g. {"HF...": {"storm_rejections": 5, "storm_window": 600}}.',
    )

    @field_validator("stale_after", mode="before")
    @classmethod
    def _empty_sends_everything(cls, value: Any) -> Any:
        """An empty variable (``SUPERSIM_ALERTS__STALE_AFTER=``) is None: nothing is stale."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("fleet_ignore_codes", mode="before")
    @classmethod
    def _split_codes(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return _json(text, "a JSON list of codes")
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("fleets", mode="before")
    @classmethod
    def _parse_fleets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _json(value, 'a JSON object such as {"HF...": {"storm_rejections": 5}}')
        return value

    @field_validator("sinks", mode="before")
    @classmethod
    def _split_sinks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("sinks", mode="after")
    @classmethod
    def _known_sinks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = available_sinks()
        chosen = {name.lower() for name in value} | {"log"}
        unknown = sorted(chosen - set(known))
        if unknown:
            raise ValueError(f"unknown sink(s) {', '.join(unknown)} (allowed: {', '.join(known)})")
        return tuple(name for name in known if name in chosen)

    @model_validator(mode="after")
    def _webhook_complete(self) -> AlertSettings:
        if "webhook" in self.sinks and (self.webhook.url is None or not self.webhook.secret):
            raise ValueError("the webhook sink needs webhook.url and webhook.secret")
        return self

    def for_fleet(self, fleet_sid: str | None) -> Thresholds:
        """The thresholds of one fleet: the global ones with that fleet's overrides."""
        overrides = self.fleets.get(fleet_sid) if fleet_sid else None
        if overrides is None:
            return self.thresholds
        changed = overrides.model_dump(exclude_none=True)
        return self.thresholds.model_copy(update=changed)


def _json(text: str, expected: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc}); expected {expected}") from None
