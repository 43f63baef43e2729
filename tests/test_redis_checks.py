"""The start-up checks of Redis (access to the worker's keys, the eviction policy), against a
real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from kinesis_support import create_stream, worker_settings
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from servers import HOST, refusing_port
from structlog.testing import capture_logs

from worker.consumer.app import run_worker
from worker.consumer.redis_checks import check_access, check_eviction_policy
from worker.errors import ConfigError
from worker.settings import load_settings

SetPolicy = Callable[[str], Awaitable[None]]


@pytest.fixture
async def set_policy(redis: Redis) -> AsyncIterator[SetPolicy]:
    """Sets the server's maxmemory-policy; the original comes back after the test."""
    original = (await redis.config_get("maxmemory-policy"))["maxmemory-policy"]

    async def set_to(policy: str) -> None:
        await redis.config_set("maxmemory-policy", policy)

    yield set_to
    await redis.config_set("maxmemory-policy", original)


Restricted = Callable[..., Awaitable[Redis]]


@pytest.fixture
async def restricted(redis: Redis, redis_url: str) -> AsyncIterator[Restricted]:
    """Clients of ACL users denied some commands (as on managed Redis); users deleted after."""
    users: list[str] = []
    clients: list[Redis] = []

    async def client(*denied: str, keys: str = "~*") -> Redis:
        user = f"restricted-{uuid.uuid4().hex[:8]}"
        rules = ["on", ">pw", keys, "+@all", *(f"-{command}" for command in denied)]
        await redis.execute_command("ACL", "SETUSER", user, *rules)
        users.append(user)
        clients.append(Redis.from_url(redis_url, username=user, password="pw"))
        return clients[-1]

    yield client
    for connection in clients:
        await connection.aclose()
    if users:
        await redis.acl_deluser(*users)


def warnings(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["log_level"] in ("warning", "error")]


async def test_noeviction_logs_nothing(redis: Redis, set_policy: SetPolicy) -> None:
    """With maxmemory-policy noeviction the check passes silently."""
    await set_policy("noeviction")
    with capture_logs() as logs:
        policy = await check_eviction_policy(redis)
    assert policy == "noeviction"
    assert logs == []


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru", "volatile-ttl"])
async def test_an_evicting_policy_is_warned_about_by_name(
    redis: Redis, set_policy: SetPolicy, policy: str
) -> None:
    """Any policy but noeviction logs one warning naming it, why it matters and the fix."""
    await set_policy(policy)
    with capture_logs() as logs:
        assert await check_eviction_policy(redis) == policy
    [warning] = warnings(logs)
    assert warning["event"] == "redis_eviction_policy_unsafe"
    assert warning["policy"] == policy
    assert warning["required"] == "noeviction"
    assert "counted twice" in warning["why"]
    assert "maxmemory-policy noeviction" in warning["fix"]
    assert "ElastiCache" in warning["fix"]


async def test_require_noeviction_refuses_an_evicting_policy(
    redis: Redis, set_policy: SetPolicy
) -> None:
    """With require_noeviction an evicting policy is a ConfigError naming it and the fix."""
    await set_policy("volatile-lru")
    with pytest.raises(ConfigError, match="volatile-lru") as info:
        await check_eviction_policy(redis, require_noeviction=True)
    assert "SUPERSIM_REQUIRE_NOEVICTION" in str(info.value)
    assert "maxmemory-policy noeviction" in str(info.value)


async def test_without_config_the_policy_is_read_from_info(
    restricted: Restricted, set_policy: SetPolicy
) -> None:
    """A user denied CONFIG (managed Redis) still gets the policy from INFO memory."""
    await set_policy("volatile-lru")
    client = await restricted("config")
    with capture_logs() as logs:
        assert await check_eviction_policy(client) == "volatile-lru"
    [warning] = warnings(logs)
    assert warning["event"] == "redis_eviction_policy_unsafe"
    assert warning["policy"] == "volatile-lru"


@pytest.mark.parametrize("require", [False, True])
async def test_a_policy_that_cannot_be_read_is_a_warning_not_a_failure(
    restricted: Restricted, set_policy: SetPolicy, require: bool
) -> None:
    """Denied CONFIG and INFO: a warning that the policy is unchecked and must be noeviction."""
    await set_policy("volatile-lru")
    client = await restricted("config", "info")
    with capture_logs() as logs:
        assert await check_eviction_policy(client, require_noeviction=require) is None
    [warning] = warnings(logs)
    assert warning["event"] == "redis_eviction_policy_unchecked"
    assert warning["required"] == "noeviction"
    assert "could not be checked" in warning["reason"]
    assert "maxmemory-policy noeviction" in warning["fix"]


async def test_an_unreachable_redis_is_raised_not_swallowed() -> None:
    """A connection failure is not a refused command: it reaches the caller."""
    with refusing_port() as port:
        client = Redis(host=HOST, port=port, socket_connect_timeout=2)
        try:
            with pytest.raises(RedisConnectionError):
                await check_eviction_policy(client)
        finally:
            await client.aclose()


def test_require_noeviction_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """SUPERSIM_REQUIRE_NOEVICTION is off by default and read from the environment."""
    monkeypatch.delenv("SUPERSIM_REQUIRE_NOEVICTION", raising=False)
    assert load_settings().require_noeviction is False
    monkeypatch.setenv("SUPERSIM_REQUIRE_NOEVICTION", "true")
    assert load_settings().require_noeviction is True


async def test_worker_start_up_warns_about_an_evicting_policy(
    kinesalite_endpoint: str, redis_url: str, set_policy: SetPolicy
) -> None:
    """`run` checks the policy at start-up, warns, and consumes anyway."""
    await set_policy("volatile-lru")
    stream = f"s-{uuid.uuid4().hex[:8]}"
    await create_stream(kinesalite_endpoint, stream, shards=1)
    settings = worker_settings(kinesalite_endpoint, redis_url, stream)
    with capture_logs() as logs:
        summary = await run_worker(settings, until_caught_up=True, install_signals=False)
    assert summary.caught_up
    events = [entry["event"] for entry in logs]
    assert "redis_eviction_policy_unsafe" in events
    assert events.index("redis_eviction_policy_unsafe") < events.index("worker_started")


async def test_worker_start_up_fails_when_noeviction_is_required(
    kinesalite_endpoint: str, redis_url: str, set_policy: SetPolicy
) -> None:
    """With SUPERSIM_REQUIRE_NOEVICTION an evicting policy stops `run` before it consumes."""
    await set_policy("allkeys-lru")
    settings = worker_settings(
        kinesalite_endpoint, redis_url, "never-read", require_noeviction=True
    )
    with capture_logs() as logs, pytest.raises(ConfigError, match="allkeys-lru"):
        await run_worker(settings, install_signals=False)
    assert "worker_started" not in [entry["event"] for entry in logs]


PREFIX = "{sw:stream:group}"


async def test_access_check_passes_and_leaves_nothing_behind(redis: Redis) -> None:
    await check_access(redis, PREFIX)
    assert await redis.keys(f"{PREFIX}*") == []


@pytest.mark.parametrize(
    ("denied", "keys"),
    [((), "~other:*"), (("eval",), "~*")],
    ids=["no-access-to-the-keys", "no-eval"],
)
async def test_access_refused_stops_start_up_saying_what_to_fix(
    restricted: Restricted, denied: tuple[str, ...], keys: str
) -> None:
    """A user without its keys or without EVAL fails at start-up, not by retrying for ever."""
    client = await restricted(*denied, keys=keys)
    with pytest.raises(ConfigError, match="needs read and write access to keys matching"):
        await check_access(client, PREFIX)
