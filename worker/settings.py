"""The worker's settings: one object, built once at start-up from the environment and passed in.

Every field is read from an environment variable named ``SUPERSIM_<FIELD>`` (upper case);
``docs/settings.md`` is generated from the field descriptions. Invalid values fail at
start-up with a ``ConfigError`` naming the variable and what it accepts. Handlers' settings
are not here: each handler's plugin declares its own model, read from
``SUPERSIM_<SECTION>__*`` by ``worker.handlers.registry``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Final

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
        description="Redis URL (redis:// or rediss://, may carry a password).",
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
    log_format: LogFormat = Field(LogFormat.AUTO, description="auto: console on a terminal.")
    log_level: LogLevel = Field(LogLevel.INFO, description="Lowest level logged.")
    redact_pii: bool = Field(True, description="Redact IMSI, IMEI, ICCID, IP and location in logs.")

    initial_position: InitialPosition = Field(
        InitialPosition.LATEST, description="Where a shard with no checkpoint starts."
    )
    initial_timestamp: AwareDatetime | None = Field(
        None, description="Start time for initial_position AT_TIMESTAMP (RFC 3339)."
    )
    batch_limit: int = Field(1000, ge=1, le=10000, description="GetRecords Limit per call.")
    idle_interval: float = Field(
        1.0, gt=0, description="Seconds between reads of a caught-up shard."
    )
    discovery_interval: float = Field(30.0, gt=0, description="Seconds between shard discoveries.")
    prefetch_batches: int = Field(2, ge=1, le=16, description="Batches read ahead per shard.")
    handler_attempts: int = Field(
        3, ge=1, le=20, description="Tries of a failing batch before bisecting."
    )
    handler_outage_patience: float = Field(
        600.0,
        ge=0,
        description="Seconds batches wait for a handler taken to be broken before the "
        "records it fails on are dead-lettered.",
    )
    shutdown_timeout: float = Field(
        20.0, gt=0, description="Seconds to finish the in-flight batch."
    )
    lease_ttl: float = Field(30.0, ge=3, description="Seconds a shard lease lasts without renewal.")
    dlq_maxlen: int = Field(100_000, ge=100, description="Capacity of the dead-letter stream.")

    @field_validator("handlers", mode="before")
    @classmethod
    def _split_handlers(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = tuple(part.strip() for part in value.split(",") if part.strip())
            if not names:
                raise ValueError("name at least one handler")
            return names
        return value

    @field_validator("log_level", "initial_position", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
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
