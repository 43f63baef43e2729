"""Error types, classified by what the caller should do about them.

``DecodeError`` is never retried: the record goes to the dead-letter store with its reason.
``RetriableError`` marks failures worth retrying with backoff (throttling, timeouts,
connection resets); anything else is permanent for the operation that raised it.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from botocore.exceptions import ClientError


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


_INFRASTRUCTURE: Final = (ConnectionError, TimeoutError, socket.gaierror, socket.herror)
"""Standard library failures of the network or of time (``asyncio.TimeoutError`` is
``TimeoutError``; ``socket.gaierror`` is DNS)."""

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
    another 4xx reply may be the record's fault and is not.

    The classes of redis, aiohttp and botocore are looked at only if their modules are
    loaded (an exception of theirs cannot exist otherwise), so importing this module loads
    none of them: commands that never talk to AWS start without the AWS and HTTP stacks."""
    if getattr(exc, "retriable", False) is True or isinstance(exc, _INFRASTRUCTURE):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    if "aiohttp" in sys.modules:
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectionError):
            return True
    if "botocore.exceptions" in sys.modules:
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        if isinstance(exc, ClientError):
            return is_aws_transient(exc)
        if isinstance(exc, BotoCoreError):
            return not isinstance(exc, ParamValidationError)
    if "redis.exceptions" in sys.modules:
        return _is_redis_outage(exc)
    return False


def _is_redis_outage(exc: BaseException) -> bool:
    """A redis-py error that says the server or the deployment failed, not a command."""
    import redis.exceptions as r

    outages = (
        r.ConnectionError,
        r.TimeoutError,
        r.ReadOnlyError,  # a replica during a failover
        r.ClusterDownError,
        r.TryAgainError,
        r.OutOfMemoryError,
        r.BusyLoadingError,
        r.MasterDownError,
        r.NoPermissionError,  # an ACL change: fix the user, the data is fine
        r.MovedError,  # pointed at a cluster: the deployment, not the data
        r.AskError,
    )
    if isinstance(exc, outages):
        return True
    return isinstance(exc, r.ResponseError) and str(exc).startswith(_INFRASTRUCTURE_REPLIES)
