"""Which failures are the infrastructure's (retry, never dead-letter) and which may be the
record's (dead-letter after retries)."""

from __future__ import annotations

import errno
import socket

import pytest
import redis.exceptions
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from worker.consumer.kinesis import is_retriable
from worker.errors import DecodeError, RetriableError, is_infrastructure_failure


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutItem",
    )


INFRASTRUCTURE = [
    RetriableError("later"),
    ConnectionResetError(),
    TimeoutError(),
    OSError(errno.EHOSTUNREACH, "No route to host"),
    socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
    EndpointConnectionError(endpoint_url="https://dynamodb.example"),
    ReadTimeoutError(endpoint_url="https://dynamodb.example"),
    NoCredentialsError(),  # a handler's environment, not its records
    client_error("ThrottlingException", 400),
    client_error("ProvisionedThroughputExceededException", 400),
    client_error("InternalServerError", 500),
    redis.exceptions.ConnectionError(),
    redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but..."),
    redis.exceptions.ResponseError("BUSY Redis is busy running a script"),
]
RECORD_FAULTS = [
    ValueError("bad value"),
    FileNotFoundError(errno.ENOENT, "No such file"),  # bounded by the outage patience
    KeyError("field"),
    DecodeError("not JSON"),
    ParamValidationError(report="Invalid length for parameter Key"),
    client_error("ValidationException", 400),
    client_error("ConditionalCheckFailedException", 400),
    redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
]


@pytest.mark.parametrize("exc", INFRASTRUCTURE, ids=repr)
def test_infrastructure_failures_are_retried_never_dead_lettered(exc: Exception) -> None:
    assert is_infrastructure_failure(exc)


@pytest.mark.parametrize("exc", RECORD_FAULTS, ids=repr)
def test_failures_that_may_be_the_records_are_not_infrastructure(exc: Exception) -> None:
    assert not is_infrastructure_failure(exc)


@pytest.mark.parametrize(
    ("exc", "retriable"),
    [
        (client_error("ProvisionedThroughputExceededException", 400), True),
        (client_error("InternalFailure", 500), True),
        (client_error("ResourceNotFoundException", 400), False),
        (client_error("AccessDeniedException", 400), False),
        (EndpointConnectionError(endpoint_url="https://kinesis.example"), True),
        (NoCredentialsError(), False),
        (ParamValidationError(report="x"), False),
    ],
    ids=repr,
)
def test_kinesis_errors_retried_or_ending_the_run(exc: Exception, retriable: bool) -> None:
    """For the consumer's own Kinesis calls configuration errors end the run instead."""
    assert is_retriable(exc) is retriable
