"""An enhanced fan-out peer for the tests: SubscribeToShard over HTTP/1.1 on top of kinesalite.

Neither moto nor kinesalite serves SubscribeToShard. This aiohttp server answers it with an
AWS event stream (``application/vnd.amazon.eventstream``: each message a prelude of total
and headers lengths with their CRC32, string headers, a JSON payload and a CRC32 of the
whole) over a chunked HTTP/1.1 response: an ``initial-response`` event, then
``SubscribeToShardEvent``s read from the kinesalite stream underneath with GetRecords, until
the subscription's period ends (5 minutes on AWS, ``subscription_seconds`` here) or the
shard is read to its end (a last event with ``ChildShards`` and no continuation).

RegisterStreamConsumer, DescribeStreamConsumer, DeregisterStreamConsumer and
ListStreamConsumers are answered here (kinesalite lacks them); every other call is proxied
to kinesalite unchanged.

Like AWS, a second subscription to a shard through one consumer while the first is open
is refused with ``ResourceInUseException``. ``FanOutFaults`` adds what AWS may do on its
own: more of those refusals, a connection cut in the middle of an event, and an account
that refuses fan-out altogether.

Continuation sequence numbers follow AWS: the last record's sequence number, or, before
any record, the position the subscription has reached, so that a subscription
``AFTER_SEQUENCE_NUMBER`` of it resumes there. kinesalite keeps that position inside its
(encrypted, with a fixed key) shard iterators; ``iterator_sequence`` reads it out.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TARGET_PREFIX = "Kinesis_20131202."
JSON_TYPE = "application/x-amz-json-1.1"
EVENT_STREAM_TYPE = "application/vnd.amazon.eventstream"
ACCOUNT = "000000000000"
REGION = "us-east-1"

# --- event-stream framing ----------------------------------------------------------------------

_STRING = 7
"""Header value type 7: a UTF-8 string with a 2-byte length."""


def encode_message(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One event-stream message: the prelude (total length, headers length, CRC32 of those
    8 bytes), the headers (each a 1-byte name length, the name, type 7 and a 2-byte value
    length, the value), the payload, and the CRC32 of everything before it."""
    encoded = b"".join(_header(name, value) for name, value in headers.items())
    prelude = struct.pack("!II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        struct.pack("!B", len(raw_name)) + raw_name + struct.pack("!BH", _STRING, len(raw_value))
    ) + raw_value


def event_message(event_type: str, body: Mapping[str, Any]) -> bytes:
    """An event of the stream (``initial-response``, ``SubscribeToShardEvent``)."""
    headers = {
        ":event-type": event_type,
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return encode_message(headers, json.dumps(body).encode())


def exception_message(code: str, message: str) -> bytes:
    """An error inside the stream: botocore raises it as ``EventStreamError`` with ``code``."""
    headers = {
        ":exception-type": code,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_message(headers, json.dumps({"message": message}).encode())


# --- kinesalite positions ----------------------------------------------------------------------

_ITERATOR_KEY = bytes.fromhex("1133a5a833666b49abf28c8ba302930f0b2fb240dccd43cf4dfbc0ca91f17751")
_ITERATOR_IV = bytes.fromhex("7bf139dbabbea2d9995d6fcae1dff7da")


def iterator_sequence(iterator: str) -> str:
    """The sequence number a kinesalite shard iterator reads from: its iterators are
    ``<8 bytes><AES-256-CBC of "time/stream/shard/sequence/0...">`` under a fixed key."""
    raw = base64.b64decode(iterator)[8:]
    decryptor = Cipher(algorithms.AES(_ITERATOR_KEY), modes.CBC(_ITERATOR_IV)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    padded = decryptor.update(raw) + decryptor.finalize()
    text = (unpadder.update(padded) + unpadder.finalize()).decode()
    return text.split("/")[3]


def sequence_before(sequence: str) -> str:
    """The sequence number AFTER_SEQUENCE_NUMBER of which kinesalite reads from ``sequence``.

    A version-2 kinesalite sequence number is 47 hex digits; AFTER_SEQUENCE_NUMBER moves its
    time field (digits 29-37, seconds) one second on, so this moves it one second back. For
    the position just after a record, that gives the record's own sequence number."""
    digits = f"{int(sequence):x}"
    if len(digits) != 47 or digits[0] != "2" or digits[-1] != "2":
        raise ValueError(f"not a version-2 kinesalite sequence number: {sequence}")
    seconds = int(digits[29:38], 16) - 1
    return str(int(f"{digits[:29]}{seconds:09x}{digits[38:]}", 16))


# --- the server --------------------------------------------------------------------------------


@dataclass
class FanOutFaults:
    in_use_first: int = 0
    """Answer the first N SubscribeToShard calls with ``ResourceInUseException``."""
    drop_after_events: int = 0
    """Cut the connection of the first subscription to have sent this many
    SubscribeToShardEvents half-way through its next one (once)."""
    refuse: str | None = None
    """Answer the consumer calls and SubscribeToShard with this error code (400):
    ``AccessDeniedException`` (no permission) or ``LimitExceededException`` (the stream's
    consumer limit)."""
    refuse_subscriptions: str | None = None
    """Answer SubscribeToShard only with this error code (a policy without that action)."""


@dataclass
class _Consumer:
    name: str
    arn: str
    stream_arn: str
    stream: str
    created: float
    deleted: float | None = None

    def status(self, now: float, activation: float) -> str:
        if self.deleted is not None:
            return "DELETING"
        return "ACTIVE" if now - self.created >= activation else "CREATING"

    def described(self, now: float, activation: float) -> dict[str, Any]:
        return {
            "ConsumerName": self.name,
            "ConsumerARN": self.arn,
            "ConsumerStatus": self.status(now, activation),
            "ConsumerCreationTimestamp": self.created,
            "StreamARN": self.stream_arn,
        }


class _Dropped(Exception):
    """The connection was cut on purpose (``FanOutFaults.drop_after_events``)."""


@dataclass
class FanOutServer:
    """A Kinesis endpoint with enhanced fan-out, on 127.0.0.1, in front of kinesalite."""

    upstream: str
    subscription_seconds: float = 300.0
    """How long a subscription lasts before the server ends its stream (AWS: 5 minutes)."""
    poll_interval: float = 0.05
    """Seconds between GetRecords reads of kinesalite while the shard has nothing new."""
    heartbeat: float = 0.5
    """Seconds after which an event is sent even without records (AWS sends them too)."""
    read_limit: int = 1000
    """Records per event at most (the GetRecords Limit underneath)."""
    activation: float = 0.2
    """Seconds a registered consumer stays CREATING (and a deregistered one DELETING)."""
    faults: FanOutFaults = field(default_factory=FanOutFaults)
    calls: Counter[str] = field(default_factory=Counter)
    """Calls received, by operation."""
    injected: Counter[str] = field(default_factory=Counter)
    """Faults injected, by kind."""
    subscriptions: Counter[str] = field(default_factory=Counter)
    """Subscriptions served, by shard."""
    events: Counter[str] = field(default_factory=Counter)
    """SubscribeToShardEvents sent, by shard."""
    starts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """Each subscription served: its shard and ``StartingPosition``, in order."""
    url: str = ""
    _consumers: dict[tuple[str, str], _Consumer] = field(default_factory=dict)
    _open: set[tuple[str, str]] = field(default_factory=set)
    _dropped: bool = False
    _closing: bool = False
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> FanOutServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        self._closing = True  # open subscriptions end at their next read
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> FanOutServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def open_subscriptions(self) -> int:
        return len(self._open)

    async def wait_all_closed(self, within: float = 10.0) -> None:
        """Until the server has seen every subscription's connection close: it notices a
        client's close on its next read of the shard, as AWS notices it some time after."""
        deadline = time.monotonic() + within
        while self._open:
            assert time.monotonic() < deadline, f"subscriptions still open: {sorted(self._open)}"
            await asyncio.sleep(0.01)

    # --- dispatch

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        operation = request.headers.get("X-Amz-Target", "").removeprefix(TARGET_PREFIX)
        self.calls[operation] += 1
        payload: dict[str, Any] = json.loads(body) if body else {}
        own = {
            "RegisterStreamConsumer": self._register,
            "DescribeStreamConsumer": self._describe,
            "DeregisterStreamConsumer": self._deregister,
            "ListStreamConsumers": self._list_consumers,
        }
        if operation in own:
            if self.faults.refuse:
                return self._refusal(operation)
            return await own[operation](payload)
        if operation == "SubscribeToShard":
            return await self._subscribe(request, payload)
        return await self._proxy(request, body)

    async def _proxy(self, request: web.Request, body: bytes) -> web.Response:
        skip = ("host", "content-length")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            content = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=content,
                headers={"Content-Type": upstream.headers.get("Content-Type", JSON_TYPE)},
            )

    async def _upstream(self, operation: str, payload: Mapping[str, Any]) -> tuple[int, Any]:
        """Call kinesalite (which wants a signature's shape, not a valid one)."""
        headers = {
            "X-Amz-Target": TARGET_PREFIX + operation,
            "Content-Type": JSON_TYPE,
            "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "Authorization": (
                f"AWS4-HMAC-SHA256 Credential=testing/20200101/{REGION}/kinesis/aws4_request, "
                "SignedHeaders=host;x-amz-date, Signature=0"
            ),
        }
        assert self._session is not None
        async with self._session.post(
            self.upstream + "/", data=json.dumps(payload), headers=headers
        ) as reply:
            return reply.status, json.loads(await reply.read() or b"{}")

    @staticmethod
    def _error(code: str, message: str, status: int = 400) -> web.Response:
        return web.json_response(
            {"__type": code, "message": message}, status=status, content_type=JSON_TYPE
        )

    def _refusal(self, operation: str) -> web.Response:
        code = self.faults.refuse or "AccessDeniedException"
        self.injected[code] += 1
        return self._error(code, f"injected: {operation} refused")

    # --- consumers

    async def _stream_of(self, stream_arn: str) -> str | web.Response:
        """The stream's name if ``stream_arn`` names a stream kinesalite has, else an error."""
        name = stream_arn.rpartition(":stream/")[2]
        status, _ = await self._upstream("DescribeStreamSummary", {"StreamName": name})
        if status != 200 or not name:
            return self._error("ResourceNotFoundException", f"Stream {stream_arn} not found")
        return name

    def _find(self, payload: Mapping[str, Any]) -> _Consumer | None:
        arn = payload.get("ConsumerARN")
        for consumer in list(self._consumers.values()):
            if arn == consumer.arn or (
                arn is None
                and consumer.stream_arn == payload.get("StreamARN")
                and consumer.name == payload.get("ConsumerName")
            ):
                return self._alive(consumer)
        return None

    def _alive(self, consumer: _Consumer) -> _Consumer | None:
        """The consumer, or None once a deregistered one is gone."""
        if consumer.deleted is not None and time.time() - consumer.deleted >= self.activation:
            del self._consumers[(consumer.stream_arn, consumer.name)]
            return None
        return consumer

    async def _register(self, payload: Mapping[str, Any]) -> web.Response:
        stream_arn, name = payload.get("StreamARN", ""), payload.get("ConsumerName", "")
        stream = await self._stream_of(stream_arn)
        if isinstance(stream, web.Response):
            return stream
        existing = self._consumers.get((stream_arn, name))
        if existing is not None and self._alive(existing) is not None:
            return self._error("ResourceInUseException", f"Consumer {name} exists")
        now = time.time()
        consumer = _Consumer(
            name, f"{stream_arn}/consumer/{name}:{int(now)}", stream_arn, stream, now
        )
        self._consumers[(stream_arn, name)] = consumer
        described = consumer.described(now, self.activation)
        del described["StreamARN"]
        return web.json_response({"Consumer": described}, content_type=JSON_TYPE)

    async def _describe(self, payload: Mapping[str, Any]) -> web.Response:
        consumer = self._find(payload)
        if consumer is None:
            return self._error("ResourceNotFoundException", "Consumer not found")
        described = consumer.described(time.time(), self.activation)
        return web.json_response({"ConsumerDescription": described}, content_type=JSON_TYPE)

    async def _deregister(self, payload: Mapping[str, Any]) -> web.Response:
        consumer = self._find(payload)
        if consumer is None:
            return self._error("ResourceNotFoundException", "Consumer not found")
        consumer.deleted = time.time()
        return web.json_response({}, content_type=JSON_TYPE)

    async def _list_consumers(self, payload: Mapping[str, Any]) -> web.Response:
        stream_arn = payload.get("StreamARN", "")
        now = time.time()
        found = [
            {k: v for k, v in c.described(now, self.activation).items() if k != "StreamARN"}
            for c in list(self._consumers.values())
            if c.stream_arn == stream_arn and self._alive(c) is not None
        ]
        return web.json_response({"Consumers": found}, content_type=JSON_TYPE)

    # --- SubscribeToShard

    async def _subscribe(
        self, request: web.Request, payload: Mapping[str, Any]
    ) -> web.StreamResponse:
        refuse = self.faults.refuse or self.faults.refuse_subscriptions
        if refuse:
            self.injected[refuse] += 1
            return self._error(refuse, "injected: SubscribeToShard refused")
        consumer = self._find(payload)
        shard = str(payload.get("ShardId", ""))
        if consumer is None:
            return self._error("ResourceNotFoundException", "Consumer not found")
        if consumer.status(time.time(), self.activation) != "ACTIVE":
            return self._error("ResourceInUseException", f"Consumer {consumer.name} not ACTIVE")
        key = (consumer.arn, shard)
        if self.injected["ResourceInUseException"] < self.faults.in_use_first:
            self.injected["ResourceInUseException"] += 1
            return self._error("ResourceInUseException", "injected: another subscription")
        if key in self._open:
            return self._error(
                "ResourceInUseException", f"Another subscription to {shard} is active"
            )
        start = payload.get("StartingPosition") or {}
        arguments: dict[str, Any] = {
            "StreamName": consumer.stream,
            "ShardId": shard,
            "ShardIteratorType": start.get("Type"),
        }
        if "SequenceNumber" in start:
            arguments["StartingSequenceNumber"] = start["SequenceNumber"]
        if "Timestamp" in start:
            arguments["Timestamp"] = start["Timestamp"]
        status, reply = await self._upstream("GetShardIterator", arguments)
        if status != 200:
            return web.json_response(reply, status=status, content_type=JSON_TYPE)
        self._open.add(key)
        self.subscriptions[shard] += 1
        self.starts.append((shard, dict(start)))
        response = web.StreamResponse(
            headers={"Content-Type": EVENT_STREAM_TYPE, "x-amzn-RequestId": str(uuid.uuid4())}
        )
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            await response.write(event_message("initial-response", {}))
            await self._stream_events(request, response, consumer.stream, shard, reply)
            await response.write_eof()
        except (ConnectionError, _Dropped):
            pass  # the client went away (or was cut off on purpose)
        finally:
            self._open.discard(key)
        return response

    async def _stream_events(
        self,
        request: web.Request,
        response: web.StreamResponse,
        stream: str,
        shard: str,
        reply: Mapping[str, Any],
    ) -> None:
        iterator: str = reply["ShardIterator"]
        ends = time.monotonic() + self.subscription_seconds
        last_sent = time.monotonic()
        while time.monotonic() < ends and not self._closing:
            if request.transport is None or request.transport.is_closing():
                return  # the subscriber closed its connection
            status, got = await self._upstream(
                "GetRecords", {"ShardIterator": iterator, "Limit": self.read_limit}
            )
            if status != 200:
                code = str(got.get("__type", "InternalFailure")).rpartition("#")[2]
                await response.write(exception_message(code, str(got.get("message", ""))))
                return
            records: list[dict[str, Any]] = got.get("Records", [])
            event: dict[str, Any] = {
                "Records": records,
                "MillisBehindLatest": _behind(records, self.read_limit),
            }
            following = got.get("NextShardIterator")
            if following is None:  # a closed shard read to its end
                event["ChildShards"] = await self._children(stream, shard)
                await self._send(request, response, shard, event)
                return
            event["ContinuationSequenceNumber"] = sequence_before(iterator_sequence(following))
            iterator = following
            if records or time.monotonic() - last_sent >= self.heartbeat:
                await self._send(request, response, shard, event)
                last_sent = time.monotonic()
            if not records:
                await asyncio.sleep(self.poll_interval)

    async def _send(
        self, request: web.Request, response: web.StreamResponse, shard: str, event: Any
    ) -> None:
        message = event_message("SubscribeToShardEvent", event)
        drop = self.faults.drop_after_events
        if drop and not self._dropped and self.events[shard] >= drop:
            self._dropped = True
            self.injected["dropped"] += 1
            await response.write(message[: len(message) // 2])
            assert request.transport is not None
            request.transport.close()
            raise _Dropped
        await response.write(message)
        self.events[shard] += 1

    async def _children(self, stream: str, shard: str) -> list[dict[str, Any]]:
        status, listed = await self._upstream("ListShards", {"StreamName": stream})
        assert status == 200, listed
        children = []
        for child in listed.get("Shards", []):
            parents = [
                p for p in (child.get("ParentShardId"), child.get("AdjacentParentShardId")) if p
            ]
            if shard in parents:
                children.append(
                    {
                        "ShardId": child["ShardId"],
                        "ParentShards": parents,
                        "HashKeyRange": child["HashKeyRange"],
                    }
                )
        return children


def _behind(records: list[dict[str, Any]], limit: int) -> int:
    """kinesalite always says 0: a full read means more is waiting, behind by its age."""
    if len(records) < limit or not records:
        return 0
    arrival = float(records[-1].get("ApproximateArrivalTimestamp", time.time()))
    return max(1, int((time.time() - arrival) * 1000))
