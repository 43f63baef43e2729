"""A fault-injecting HTTP proxy in front of a Kinesis server, for what no local server does.

It forwards every request to the upstream server and can answer some GetRecords calls
itself with throttling (``ProvisionedThroughputExceededException``), an expired iterator
(``ExpiredIteratorException``), a server error, as AWS would, or an empty reply, and hold
any operation's answers for a while. It also counts GetRecords
calls per shard by following the iterators it sees.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

TARGET_PREFIX = "Kinesis_20131202."


@dataclass
class Faults:
    throttle_every: int = 0
    expire_every: int = 0
    server_error_every: int = 0
    delay: dict[str, float] = field(default_factory=dict)
    """Seconds to hold each call of an operation (e.g. ``{"ListShards": 2.0}``) before
    forwarding it: a slow answer, not an error."""
    fail_first: dict[str, int] = field(default_factory=dict)
    """Answer the first N calls of an operation with a server error (500 InternalFailure)."""
    empty_at: frozenset[int] = frozenset()
    """GetRecords calls (1 for the first) answered 200 with an empty object: a garbled
    reply without records or a next iterator, which is not the end of an open shard."""


@dataclass
class FaultProxy:
    upstream: str
    faults: Faults = field(default_factory=Faults)
    calls: Counter[str] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)
    get_records_by_shard: Counter[str] = field(default_factory=Counter)
    _iterator_shard: dict[str, str] = field(default_factory=dict)
    _arrived: defaultdict[str, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None
    url: str = ""

    async def start(self) -> FaultProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A stop does not wait for answers it holds back (``Faults.delay``): the worker that
        # asked has gone by then, and a graceful wait would hold each test up for the delay.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        self._session = aiohttp.ClientSession()
        return self

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def called(self, operation: str) -> None:
        """Return once a call of ``operation`` has arrived (at once if one already has)."""
        await self._arrived[operation].wait()

    def _fault(self, operation: str) -> tuple[int, str] | None:
        if self.calls[operation] <= self.faults.fail_first.get(operation, 0):
            return 500, "InternalFailure"
        if operation != "GetRecords":
            return None
        n = self.calls["GetRecords"]
        f = self.faults
        if f.throttle_every and n % f.throttle_every == 0:
            return 400, "ProvisionedThroughputExceededException"
        if f.expire_every and n % f.expire_every == 0:
            return 400, "ExpiredIteratorException"
        if f.server_error_every and n % f.server_error_every == 0:
            return 500, "InternalFailure"
        return None

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        operation = request.headers.get("X-Amz-Target", "").removeprefix(TARGET_PREFIX)
        self.calls[operation] += 1
        self._arrived[operation].set()
        payload = json.loads(body) if body else {}
        if operation == "GetRecords":
            shard = self._iterator_shard.get(payload.get("ShardIterator", ""), "?")
            self.get_records_by_shard[shard] += 1
        hold = self.faults.delay.get(operation)
        if hold:
            await asyncio.sleep(hold)
        if operation == "GetRecords" and self.calls["GetRecords"] in self.faults.empty_at:
            self.injected["empty"] += 1
            return web.json_response({}, content_type="application/x-amz-json-1.1")
        fault = self._fault(operation)
        if fault is not None:
            status, code = fault
            self.injected[code] += 1
            return web.json_response(
                {"__type": code, "message": f"injected {code}"},
                status=status,
                content_type="application/x-amz-json-1.1",
            )
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as upstream:
            content = await upstream.read()
            status = upstream.status
            content_type = upstream.headers.get("Content-Type", "application/x-amz-json-1.1")
        if status == 200 and operation in ("GetShardIterator", "GetRecords"):
            self._follow(operation, payload, json.loads(content))
        return web.Response(body=content, status=status, headers={"Content-Type": content_type})

    def _follow(self, operation: str, request: dict[str, str], response: dict[str, str]) -> None:
        if operation == "GetShardIterator":
            self._iterator_shard[response["ShardIterator"]] = request["ShardId"]
        elif response.get("NextShardIterator"):
            shard = self._iterator_shard.pop(request["ShardIterator"], "?")
            self._iterator_shard[response["NextShardIterator"]] = shard
