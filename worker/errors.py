"""Error types, classified by what the caller should do about them.

``DecodeError`` is never retried: the record goes to the dead-letter store with its reason.
``RetriableError`` marks failures worth retrying with backoff (throttling, timeouts,
connection resets); anything else is permanent for the operation that raised it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import redis.exceptions


class WorkerError(Exception):
    """Base class of the worker's own errors."""

    retriable: bool = False


class DecodeError(WorkerError, ValueError):
    """A record is not a valid event. ``reason`` says what is wrong in words a person can act on."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


class RetriableError(WorkerError):
    """A transient failure: retry with capped, jittered backoff."""

    retriable = True


class ConfigError(WorkerError):
    """Settings or arguments are invalid; the message names the variable and allowed values."""


_INFRASTRUCTURE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica during a failover
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.MasterDownError,
    redis.exceptions.NoPermissionError,  # an ACL change: fix the user, the data is fine
    redis.exceptions.MovedError,  # pointed at a cluster: the deployment, not the data
    redis.exceptions.AskError,
    aiohttp.ClientConnectionError,
    asyncio.TimeoutError,
    ConnectionError,
    TimeoutError,
)


_INFRASTRUCTURE_REPLIES = ("BUSY ", "NOREPLICAS ", "UNBLOCKED ")
"""Redis error replies without a class of their own that say the server is busy or short
of replicas (a long script, ``min-replicas-to-write``), not that a command was wrong."""


def is_infrastructure_failure(exc: BaseException) -> bool:
    """Redis, the network or a timeout failed, not the data: retry, never dead-letter."""
    if getattr(exc, "retriable", False) is True or isinstance(exc, _INFRASTRUCTURE):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        _INFRASTRUCTURE_REPLIES
    )
