"""Error types, classified by what the caller should do about them.

``DecodeError`` is never retried: the record goes to the dead-letter store with its reason.
``RetriableError`` marks failures worth retrying with backoff (throttling, timeouts,
connection resets); anything else is permanent for the operation that raised it.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Final

import aiohttp
import redis.exceptions
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError


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
    socket.gaierror,  # DNS
    socket.herror,
)
_NETWORK_ERRNOS: Final = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.EPIPE,
        errno.EADDRNOTAVAIL,
    }
)
"""``OSError`` numbers that mean the network failed (a file or permission error does not)."""


_INFRASTRUCTURE_REPLIES = ("BUSY ", "NOREPLICAS ", "UNBLOCKED ", "MISCONF ")
"""Redis error replies without a class of their own that say the server is busy, short of
replicas (a long script, ``min-replicas-to-write``) or refusing writes because it cannot
persist (``MISCONF``: a full disk), not that a command was wrong."""

AWS_RETRIABLE_CODES: Final = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "LimitExceededException",
        "ThrottlingException",
        "KMSThrottlingException",
        "InternalFailure",
        "InternalFailureException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
"""AWS error codes that mean throttling or a server-side failure: worth retrying."""


def is_aws_transient(exc: ClientError) -> bool:
    """An AWS error reply that says throttled or a server error (5xx), not a bad request."""
    code = exc.response.get("Error", {}).get("Code") or ""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return code in AWS_RETRIABLE_CODES or (isinstance(status, int) and status >= 500)


def is_infrastructure_failure(exc: BaseException) -> bool:
    """Redis, AWS, the network or a timeout failed, not the data: retry, never dead-letter.

    A handler calling AWS is covered too: botocore's own errors (no endpoint, a timeout,
    missing credentials) and throttling or 5xx replies; a refused request parameter or
    another 4xx reply may be the record's fault and is not."""
    if getattr(exc, "retriable", False) is True or isinstance(exc, _INFRASTRUCTURE):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    if isinstance(exc, ClientError):
        return is_aws_transient(exc)
    if isinstance(exc, BotoCoreError):
        return not isinstance(exc, ParamValidationError)
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        _INFRASTRUCTURE_REPLIES
    )
