"""The stream consumer that enhanced fan-out reads through: registered (or reused) under
the consumer group's name, and ACTIVE before any subscription.

Several replicas may start at once: each describes the consumer first, and one whose
registration is refused as in use (another replica's came first) describes it again. A
consumer being deleted is waited out and registered anew. The account refusing fan-out
(no permission, or the stream at its limit of 20 consumers) raises ``FanOutRefused``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Final, cast

import structlog

from worker.backoff import Backoff
from worker.consumer.kinesis import KinesisClient, error_code, is_retriable
from worker.errors import RetriableError

CONSUMER_TIMEOUT: Final = 300.0
"""Seconds to wait for the stream consumer to become ACTIVE (or a deleted one to go)."""
IN_USE: Final = "ResourceInUseException"
NOT_FOUND: Final = "ResourceNotFoundException"
REFUSED: Final = frozenset({"AccessDeniedException"})
"""Codes that mean the account does not let this worker use fan-out."""
REGISTER_LIMIT_ATTEMPTS: Final = 3
"""RegisterStreamConsumer answered ``LimitExceededException`` this many times: the stream
has its most consumers (20), not a passing throttle."""


class FanOutRefused(Exception):
    """The account refuses enhanced fan-out to this worker."""


async def stream_arn(client: KinesisClient, stream: str) -> str:
    summary = await client.describe_stream_summary(StreamName=stream)
    return str(summary["StreamDescriptionSummary"]["StreamARN"])


async def ensure_consumer(
    client: KinesisClient,
    stream: str,
    name: str,
    *,
    within: float = CONSUMER_TIMEOUT,
    poll: float = 0.5,
) -> str:
    """The ARN of the stream consumer ``name``, registered if need be, once ACTIVE.

    Several replicas may start at once: each describes first, and one that finds its
    registration refused as in use describes again. Raises ``FanOutRefused`` when the
    account refuses fan-out."""
    log = structlog.get_logger("worker.consumer.stream_consumer")
    arn = await stream_arn(client, stream)
    deadline = time.monotonic() + within
    backoff = Backoff(base=0.5, cap=5.0)
    failures = limited = 0
    while True:
        try:
            found = await _describe_or_register(client, arn, name)
        except Exception as exc:
            code = error_code(exc)
            if code in REFUSED:
                raise FanOutRefused(f"{code}: {exc}") from exc
            if code == "LimitExceededException" and getattr(exc, "operation_name", "") == (
                "RegisterStreamConsumer"
            ):
                limited += 1
                if limited >= REGISTER_LIMIT_ATTEMPTS:
                    raise FanOutRefused(f"{code}: {exc}") from exc
            elif not is_retriable(exc):
                raise
            failures += 1
            if time.monotonic() > deadline:
                raise
            delay = backoff.delay(failures)
            log.warning(
                "fanout_consumer_retry",
                consumer=name,
                attempt=failures,
                delay=round(delay, 3),
                error=f"{type(exc).__name__}: {exc}",
            )
            await asyncio.sleep(delay)
            continue
        if found is None:
            continue  # registered by another replica meanwhile: describe it
        status = found["ConsumerStatus"]
        if status == "ACTIVE":
            consumer_arn = str(found["ConsumerARN"])
            log.info("fanout_consumer_active", consumer=name, consumer_arn=consumer_arn)
            return consumer_arn
        if time.monotonic() > deadline:
            raise RetriableError(f"stream consumer {name} still {status} after {within:.0f} s")
        await asyncio.sleep(poll)


async def _describe_or_register(
    client: KinesisClient, arn: str, name: str
) -> Mapping[str, Any] | None:
    """The consumer's description (registering it when there is none), or None when
    another replica registered it between the two calls."""
    log = structlog.get_logger("worker.consumer.stream_consumer")
    try:
        described = await client.describe_stream_consumer(StreamARN=arn, ConsumerName=name)
        return cast("Mapping[str, Any]", described["ConsumerDescription"])
    except Exception as exc:
        if error_code(exc) != NOT_FOUND:
            raise
    try:
        registered = await client.register_stream_consumer(StreamARN=arn, ConsumerName=name)
    except Exception as exc:
        if error_code(exc) == IN_USE:
            return None
        raise
    log.info("fanout_consumer_registered", consumer=name, stream_arn=arn)
    return cast("Mapping[str, Any]", registered["Consumer"])
