"""Shared pytest fixtures.

Real servers (see tests/servers.py) are session-scoped: each starts the first time a test
asks for it and stops when the session ends. Tests should use the function-scoped
fixtures (``redis_url``, ``moto_endpoint``, ``kinesalite_endpoint``), which reset the
server before every test so no state leaks between tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import alerts_support
import pytest
import servers
import structlog
from redis.asyncio import Redis

from worker import logs

# --- hermetic AWS environment ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fake_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials for every test; never pick up a real profile or endpoint override."""
    for name in list(os.environ):
        if name.startswith("AWS_ENDPOINT_URL") or name in (
            "AWS_PROFILE",
            "AWS_DEFAULT_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_SECURITY_TOKEN",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(autouse=True)
def _no_supersim_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SUPERSIM_ variable of the calling shell reaches a test: commands run in-process
    refuse unknown ones, and known ones would change what a test runs."""
    for name in list(os.environ):
        if name.upper().startswith("SUPERSIM_"):
            monkeypatch.delenv(name)


# --- real servers, one per session (started lazily) ---------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[servers.RedisServer]:
    server = servers.start_redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[servers.MotoServer]:
    server = servers.start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kinesalite_server() -> Iterator[servers.KinesaliteServer]:
    server = servers.start_kinesalite()
    yield server
    server.stop()


# --- per-test views of those servers, reset before each test ------------------------------


@pytest.fixture
def redis_url(redis_server: servers.RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of an empty redis."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def moto_endpoint(moto_server: servers.MotoServer) -> str:
    """``http://127.0.0.1:PORT`` of a moto_server with no state (all services reset)."""
    moto_server.reset()
    return moto_server.url


@pytest.fixture
def kinesalite_endpoint(kinesalite_server: servers.KinesaliteServer) -> str:
    """``http://127.0.0.1:PORT`` of a kinesalite with no streams."""
    kinesalite_server.reset()
    return kinesalite_server.url


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections for the whole test (held bound)."""
    with servers.refusing_port() as port:
        yield port


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """An asyncio client of the (flushed) test redis-server."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def receiver() -> AsyncIterator[alerts_support.Receiver]:
    """A real HTTP webhook receiver on 127.0.0.1 that verifies signatures."""
    server = alerts_support.Receiver(alerts_support.SECRET)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Commands under test configure structlog (and route the standard library's logging
    through it) for the process; undo that after each test (its output stream may be a
    capture that pytest closes)."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logs.reset()
