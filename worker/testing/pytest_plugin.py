"""pytest fixtures for handler authors, registered with pytest by the ``pytest11`` entry
point of ``supersim-worker`` (nothing to configure once it is installed):

- ``supersim_redis_url``: the URL of an empty Redis database. A real ``redis-server`` is
  started on a free loopback port for the session (``redis-server`` must be on PATH, or
  named by ``REDIS_SERVER``), unless the option ``--supersim-redis-url`` (or the ini
  setting ``supersim_redis_url``) names one to use instead; that database is emptied
  (FLUSHDB) before every test that asks for it.
- ``supersim_fleet``: the default ``SimulatedFleet`` (records and ground truth), built once.
- ``supersim_simulate``: ``simulate_fleet`` for other options, each built once a session.

The names start with ``supersim_`` so they never clash with a project's own fixtures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Final

import pytest
import redis

from worker.devtools.local_servers import start_redis
from worker.testing.fleet import SimulatedFleet, simulate_fleet

REDIS_URL_OPTION: Final = "supersim_redis_url"
_HELP: Final = (
    "Redis URL whose database the supersim_redis_url fixture empties and hands to tests "
    "(default: a redis-server started for the session)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("supersim-worker")
    group.addoption("--supersim-redis-url", dest=REDIS_URL_OPTION, default=None, help=_HELP)
    parser.addini(REDIS_URL_OPTION, _HELP, default="")


@pytest.fixture(scope="session")
def supersim_redis_server(pytestconfig: pytest.Config) -> Iterator[str]:
    """The URL of the session's Redis: ``--supersim-redis-url`` (or the ini setting), or
    a redis-server started for the session (and stopped after it)."""
    given = pytestconfig.getoption(REDIS_URL_OPTION) or pytestconfig.getini(REDIS_URL_OPTION)
    if given:
        yield given
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def supersim_redis_url(supersim_redis_server: str) -> str:
    """The URL of the session's Redis, its database emptied for this test."""
    with redis.Redis.from_url(supersim_redis_server, socket_timeout=10) as client:
        client.flushdb()
    return supersim_redis_server


@pytest.fixture(scope="session")
def supersim_simulate() -> Callable[..., SimulatedFleet]:
    """``simulate_fleet(**options)``, each distinct set of options generated once."""
    cached: Callable[..., SimulatedFleet] = functools.cache(simulate_fleet)
    return cached


@pytest.fixture(scope="session")
def supersim_fleet(supersim_simulate: Callable[..., SimulatedFleet]) -> SimulatedFleet:
    """The default simulated fleet (``worker.testing.fleet.DEFAULT_FLEET``)."""
    return supersim_simulate()


__all__ = [
    "pytest_addoption",
    "supersim_fleet",
    "supersim_redis_server",
    "supersim_redis_url",
    "supersim_simulate",
]
