"""The worker's settings: one object, built once at start-up from the environment and passed in.

Every field is read from an environment variable named ``SUPERSIM_<FIELD>`` (upper case);
``docs/settings.md`` is generated from the field descriptions. Invalid values fail at
start-up with a ``ConfigError`` naming the variable and what it accepts. Handlers' settings
are not here: each handler's plugin declares its own model, read from
``SUPERSIM_<SECTION>__*`` by ``worker.handlers.registry``.

An unknown ``SUPERSIM_*`` variable is refused at start-up (``unknown_variables`` here
finds them; ``worker.handlers.registry.check_environment`` knows every valid name), so
a misspelt name fails loudly instead of leaving its default in place.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import types
from collections.abc import Collection, Iterator, Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final, Union, get_args, get_origin

from pydantic import AwareDatetime, BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from worker.errors import ConfigError

ENV_PREFIX: Final = "SUPERSIM_"


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class InitialPosition(StrEnum):
    LATEST = "LATEST"
    TRIM_HORIZON = "TRIM_HORIZON"
    AT_TIMESTAMP = "AT_TIMESTAMP"


class RetrievalMode(StrEnum):
    POLLING = "polling"
    FANOUT = "fanout"


class FanOutFallback(StrEnum):
    POLLING = "polling"
    STOP = "stop"


FloatSeconds = Annotated[float, Field(json_schema_extra={"unit": "seconds"})]
"""A duration given as a number of seconds (the settings reference calls its type seconds)."""


class Settings(BaseSettings):
    """The consumer's settings (handlers have their own sections)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
        frozen=True,
    )

    stream_name: str = Field("", description="Kinesis stream to consume (required by `run`).")
    region: str = Field("us-east-1", description="AWS region of the stream.")
    endpoint_url: str | None = Field(
        None,
        description="Kinesis endpoint URL; defaults to AWS_ENDPOINT_URL_KINESIS, then "
        "AWS_ENDPOINT_URL, then the AWS default for the region.",
    )
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL: redis://, rediss:// (TLS) or unix://, may carry a password; "
        "never logged.",
    )
    require_noeviction: bool = Field(
        False,
        description="Refuse to start unless Redis's maxmemory-policy is noeviction "
        "(otherwise a warning is logged).",
    )
    consumer_group: str = Field(
        "supersim-worker",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Name shared by the replicas that split the stream's shards between them.",
    )
    handlers: Annotated[tuple[str, ...], NoDecode] = Field(
        ("log",), description="Comma-separated handler names, run in this order."
    )
    log_format: LogFormat = Field(
        LogFormat.AUTO, description="auto: console on a terminal, JSON lines otherwise."
    )
    log_level: LogLevel = Field(LogLevel.INFO, description="Lowest level logged.")
    redact_pii: bool = Field(True, description="Redact IMSI, IMEI, ICCID, IP and location in logs.")

    initial_position: InitialPosition = Field(
        InitialPosition.LATEST, description="Where a shard with no checkpoint starts."
    )
    initial_timestamp: AwareDatetime | None = Field(
        None,
        description="Start time when initial_position is AT_TIMESTAMP, and required then: "
        "RFC 3339 with a UTC offset.",
    )
    batch_limit: int = Field(1000, ge=1, le=10000, description="GetRecords Limit per call.")
    idle_interval: FloatSeconds = Field(
        1.0, gt=0, description="Seconds between reads of a caught-up shard."
    )
    discovery_interval: FloatSeconds = Field(
        30.0,
        gt=0,
        description="Seconds between shard listings (ListShards); also at once when a "
        "shard ends. Leases are balanced every second, apart from this.",
    )
    prefetch_batches: int = Field(2, ge=1, le=16, description="Batches read ahead per shard.")
    retrieval: RetrievalMode = Field(
        RetrievalMode.POLLING,
        description="How shards are read: `polling` (GetRecords, sharing each shard's read "
        "budget with the stream's other consumers) or `fanout` (enhanced fan-out: "
        "SubscribeToShard through a stream consumer named after the consumer group, with "
        "its own 2 MB/s per shard; needs deploy/iam/consumer-fanout-policy.json).",
    )
    fanout_refused: FanOutFallback = Field(
        FanOutFallback.POLLING,
        description="With `fanout`, when the account refuses enhanced fan-out (no "
        "permission, or the stream's limit of registered consumers): `polling` logs "
        "`fanout_refused` and polls instead; `stop` stops the worker (exit 2).",
    )
    get_records_rate: float = Field(
        5.0,
        gt=0,
        le=5,
        description="Most GetRecords calls per second per shard when polling. Kinesis "
        "allows 5 per shard for all the stream's consumers together: give a backfill "
        "running beside a live group less (deploy/kubernetes/backfill-job.yaml uses 1).",
    )
    handler_attempts: int = Field(
        3, ge=1, le=20, description="Tries of a failing batch before bisecting."
    )
    handler_outage_patience: FloatSeconds = Field(
        600.0,
        ge=0,
        description="Seconds batches wait for a handler taken to be broken before the "
        "records it fails on are dead-lettered.",
    )
    shutdown_timeout: FloatSeconds = Field(
        20.0, gt=0, description="Seconds to finish the in-flight batch."
    )
    lease_ttl: FloatSeconds = Field(
        8.0,
        ge=3,
        description="Seconds a shard lease (and a replica's heartbeat) lasts without "
        "renewal; renewed every quarter of it. A crashed replica's shards are read again "
        "elsewhere about this long after it died.",
    )
    dlq_maxlen: int = Field(100_000, ge=100, description="Capacity of the dead-letter stream.")
    handler_timeout: FloatSeconds = Field(
        60.0,
        gt=0,
        description="Seconds one handler call may take; a call cut off is an outage: the "
        "batch is retried with backoff, never dead-lettered, and shows in metrics and health.",
    )
    http_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of /metrics (Prometheus), /healthz and /readyz on all interfaces; "
        "unset: no HTTP server.",
    )
    stall_timeout: FloatSeconds = Field(
        300.0,
        gt=0,
        description="/healthz fails when an owned shard with records waiting has made no "
        "progress (a batch handled) for this many seconds.",
    )

    @field_validator("handlers", mode="before")
    @classmethod
    def _split_handlers(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = split_names(value)
            if not names:
                raise ValueError("name at least one handler")
            return names
        return value

    @field_validator("log_level", "initial_position", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", "retrieval", "fanout_refused", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url", mode="after")
    @classmethod
    def _check_redis_scheme(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    def kinesis_endpoint(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The endpoint to use: ours, else the standard AWS variables, else None (AWS)."""
        if self.endpoint_url:
            return self.endpoint_url
        env = os.environ if environ is None else environ
        return env.get("AWS_ENDPOINT_URL_KINESIS") or env.get("AWS_ENDPOINT_URL") or None

    @property
    def redis_dsn(self) -> str:
        return self.redis_url.get_secret_value()


def split_names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names (``SUPERSIM_HANDLERS``), in order, blanks dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (and explicit overrides, e.g. CLI flags)."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(explain(exc, Settings)) from None
    except SettingsError as exc:  # a value that should be JSON is not (e.g. a whole section)
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ConfigError(
            f"invalid settings: {exc}{cause} (variables under {ENV_PREFIX} that hold "
            "objects or lists take JSON)"
        ) from None
    if settings.initial_position is InitialPosition.AT_TIMESTAMP and not settings.initial_timestamp:
        raise ConfigError(
            f"{ENV_PREFIX}INITIAL_TIMESTAMP: required when {ENV_PREFIX}INITIAL_POSITION is "
            "AT_TIMESTAMP (an RFC 3339 time such as 2024-03-01T00:00:00Z)"
        )
    return settings


def explain(exc: ValidationError, model: type[BaseModel]) -> str:
    """A validation error of settings read from the environment, one part per wrong
    variable: ``SUPERSIM_A__B: what is wrong (allowed: ...)``."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        path = [str(part) for part in err["loc"] if not isinstance(part, int)]
        allowed = ""
        annotation = _annotation(model, path)
        if isinstance(annotation, type) and issubclass(annotation, StrEnum):
            allowed = " (allowed: " + ", ".join(m.value for m in annotation) + ")"
        lines.append(f"{ENV_PREFIX}{'__'.join(path).upper()}: {err['msg']}{allowed}")
    return "invalid settings: " + "; ".join(lines)


def _annotation(model: type[BaseModel], path: list[str]) -> Any:
    """The type of the field at ``path`` (nested models followed), or None."""
    annotation: Any = model
    for name in path:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        field = annotation.model_fields.get(name)
        if field is None:
            return None
        annotation = field.annotation
    return annotation


def utc_timestamp(value: str) -> datetime:
    """Parse an RFC 3339 time given on the command line; a ConfigError names the problem."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"not an RFC 3339 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise ConfigError(f"time {value!r} has no UTC offset; add Z or +00:00")
    return parsed


# --- unknown variables ---------------------------------------------------------------------


def variable_names(model: type[BaseModel], prefix: str = ENV_PREFIX) -> Iterator[str]:
    """Every variable that sets a field of ``model`` (upper case): ``<PREFIX><FIELD>``, and
    for a field holding a model (also an optional one) its own fields below it,
    ``<PREFIX><FIELD>__<NESTED>``; the field itself then takes the whole model as JSON.
    Other fields (lists, dicts such as the alerts' ``fleets``) take JSON at their name."""
    for name, field in model.model_fields.items():
        variable = f"{prefix}{name.upper()}"
        yield variable
        nested = _model_of(field.annotation)
        if nested is not None:
            yield from variable_names(nested, f"{variable}__")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``Model`` or ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [found for arg in get_args(annotation) if (found := _model_of(arg)) is not None]
        return models[0] if len(models) == 1 else None
    return None


_SERVICE_LINKS: Final = (
    (r"_SERVICE_HOST", r"[0-9A-Fa-f.:]+"),
    (r"_SERVICE_PORT(?:_[A-Z0-9_]+)?", r"[0-9]+"),
    (r"_PORT", r"(?:tcp|udp|sctp)://\S+"),
    (r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)", r"(?:tcp|udp|sctp)://\S+"),
    (r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)_PROTO", r"tcp|udp|sctp"),
    (r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)_PORT", r"[0-9]+"),
    (r"_PORT_[0-9]+_(?:TCP|UDP|SCTP)_ADDR", r"[0-9A-Fa-f.:]+"),
)


@functools.cache
def _service_link_patterns() -> tuple[tuple[re.Pattern[str], re.Pattern[str]], ...]:
    """``_SERVICE_LINKS`` compiled on first use: only a variable we do not know is checked."""
    return tuple(
        (re.compile(rf"[A-Z0-9_]+{name}"), re.compile(value)) for name, value in _SERVICE_LINKS
    )


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` looks like a variable Kubernetes injects for a Service in the
    pod's namespace (``<SERVICE>_SERVICE_HOST=10.0.0.7``, ``<SERVICE>_PORT=tcp://...``):
    a Service named ``supersim-...`` yields ``SUPERSIM_...`` variables that are not ours.
    Both the name's shape and the value's must match."""
    upper = name.upper()
    return any(
        pattern.fullmatch(upper) and shape.fullmatch(value)
        for pattern, shape in _service_link_patterns()
    )


def unknown_variables(
    environ: Mapping[str, str], known: Collection[str], *, prefix: str = ENV_PREFIX
) -> list[str]:
    """The variables of ``environ`` under ``prefix`` (in any case) that are not in
    ``known`` (upper case), Kubernetes service links left aside, sorted."""
    return sorted(
        name
        for name, value in environ.items()
        if name.upper().startswith(prefix)
        and name.upper() not in known
        and not is_service_link(name, value)
    )


def closest_name(name: str, known: Collection[str], *, prefix: str = ENV_PREFIX) -> str | None:
    """The valid name most like ``name`` (compared without the prefix), or None."""
    stems = {candidate.removeprefix(prefix): candidate for candidate in known}
    found = difflib.get_close_matches(name.upper().removeprefix(prefix), stems, n=1, cutoff=0.6)
    return stems[found[0]] if found else None


def refuse_unknown(unknown: Collection[str], known: Collection[str]) -> None:
    """Raise a ConfigError naming each unknown variable and the closest valid name."""
    if not unknown:
        return
    parts = []
    for name in unknown:
        parent = _leaf_parent(name, known)
        suggestion = closest_name(name, known)
        if parent:
            hint = (
                f"nothing is read below {parent}: give its whole value there (JSON for an object)"
            )
        elif suggestion:
            hint = f"did you mean {suggestion}?"
        else:
            hint = "no similar variable"
        parts.append(f"{name}: unknown variable ({hint})")
    raise ConfigError(
        "unknown settings: "
        + "; ".join(parts)
        + f" (every {ENV_PREFIX}* variable must be a setting: the consumer's are listed in "
        "docs/operations.md, a handler's are read from its section)"
    )


def _leaf_parent(name: str, known: Collection[str]) -> str | None:
    """The valid name without variables below it that ``name`` reaches below
    (``SUPERSIM_ALERTS__FLEETS`` for ``SUPERSIM_ALERTS__FLEETS__HF...``): that field's
    value is given whole, a dict or list as JSON."""
    upper = name.upper()
    parents = [candidate for candidate in known if upper.startswith(f"{candidate}__")]
    if not parents:
        return None
    parent = max(parents, key=len)
    has_children = any(candidate.startswith(f"{parent}__") for candidate in known)
    return None if has_children else parent
