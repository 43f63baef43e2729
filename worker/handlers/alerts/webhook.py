"""The webhook sink: each alert as a signed JSON POST, retried on 5xx and timeouts.

Request headers:

- ``X-Supersim-Timestamp``: Unix seconds when this attempt was signed.
- ``X-Supersim-Signature``: ``v1=`` and the hex HMAC-SHA256, keyed with the shared secret,
  of ``<timestamp>.`` followed by the raw body. Receivers check it with ``verify`` (and
  reject old timestamps, which stops replays).
- ``Idempotency-Key``: the alert's ``delivery_key`` (``<alert id>:<status>``). A retried,
  re-claimed or replicated delivery of the same alert carries the same key and body, so
  the receiver can drop repeats.

One ``send`` makes up to ``attempts`` POSTs with jittered exponential backoff while the
answer is retriable (5xx, 408, 425, 429, timeouts, connection errors). If all fail the
result is retriable and the outbox keeps the alert for a later round. Other answers
(4xx, redirects) cannot succeed by repetition: the alert is dead-lettered with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Final

import aiohttp
import structlog

from worker.backoff import Backoff
from worker.handlers.alerts.model import Alert
from worker.handlers.alerts.settings import AlertSettings, WebhookSettings
from worker.handlers.alerts.sinks import DELIVERED, SendResult

TIMESTAMP_HEADER: Final = "X-Supersim-Timestamp"
SIGNATURE_HEADER: Final = "X-Supersim-Signature"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
ALERT_ID_HEADER: Final = "X-Supersim-Alert-Id"
SIGNATURE_VERSION: Final = "v1"
DEFAULT_TOLERANCE: Final = 300.0
_RETRIABLE_STATUS: Final = frozenset({408, 425, 429})


def sign(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` signed at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify(
    secret: str | bytes,
    body: bytes,
    *,
    timestamp: str | None,
    signature: str | None,
    now: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """Whether a received request was signed with ``secret`` within ``tolerance`` seconds."""
    if not timestamp or not signature:
        return False
    try:
        signed_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - signed_at) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, signed_at, body), signature)


def retriable_status(status: int) -> bool:
    return status >= 500 or status in _RETRIABLE_STATUS


class WebhookSink:
    """POSTs alerts to one URL. Owns an aiohttp session, opened on first use."""

    name = "webhook"
    remote = True

    def __init__(
        self, settings: WebhookSettings, *, clock: Callable[[], float] = time.time
    ) -> None:
        if settings.url is None or settings.secret is None:
            raise ValueError("the webhook sink needs a url and a secret")
        self._url = settings.url
        self._secret = settings.secret.get_secret_value().encode()
        self._attempts = settings.attempts
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout.total_seconds())
        self._backoff = Backoff(
            base=settings.backoff_base.total_seconds(), cap=settings.backoff_cap.total_seconds()
        )
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._log = structlog.get_logger("worker.handlers.alerts.webhook")

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    def headers(self, alert: Alert, body: bytes) -> dict[str, str]:
        timestamp = int(self._clock())
        return {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: sign(self._secret, timestamp, body),
            IDEMPOTENCY_HEADER: alert.delivery_key,
            ALERT_ID_HEADER: alert.id,
        }

    async def send(self, alert: Alert) -> SendResult:
        body = alert.body()
        reason = ""
        for attempt in range(1, self._attempts + 1):
            try:
                async with self._client().post(
                    self._url, data=body, headers=self.headers(alert, body), allow_redirects=False
                ) as response:
                    # The status decides; the body is never read (a receiver's slow or huge
                    # answer must not turn an accepted alert into a retry, nor fill memory).
                    status = response.status
                    response.release()
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if 200 <= status < 300:
                    return DELIVERED
                reason = f"HTTP {status}"
                if not retriable_status(status):
                    return SendResult(delivered=False, retriable=False, reason=reason)
            left = self._attempts - attempt
            self._log.warning(
                "webhook_attempt_failed",
                alert_id=alert.id,
                status=alert.status.value,
                reason=reason,
                attempts_left=left,
            )
            if left:
                await asyncio.sleep(self._backoff.delay(attempt))
        return SendResult(delivered=False, retriable=True, reason=reason)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def webhook_sink(settings: AlertSettings) -> WebhookSink:
    """The ``webhook`` sink of the alert settings (``SUPERSIM_ALERTS__WEBHOOK__*``)."""
    return WebhookSink(settings.webhook)
