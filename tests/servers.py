"""Real servers for tests: redis-server and moto_server (shared with ``replay``, see
``worker/devtools/local_servers.py``) and kinesalite, which only the tests use (npm, under tests/).

Plain helpers without pytest, so they can also be used from scripts. Every server listens
on 127.0.0.1 only, on a free port, and keeps its state in memory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from worker.devtools.local_servers import (
    HOST,
    MotoServer,
    RedisServer,
    ServerError,
    ServerProcess,
    free_port,
    http_answers,
    start_moto,
    start_redis,
    wait_until,
)

__all__ = [
    "HOST",
    "KinesaliteServer",
    "MotoServer",
    "RedisServer",
    "ServerError",
    "ServerProcess",
    "free_port",
    "free_ports",
    "refusing_port",
    "start_kinesalite",
    "start_moto",
    "start_redis",
    "wait_until",
]

TESTS_DIR = Path(__file__).resolve().parent
KINESALITE_SCRIPT = TESTS_DIR / "kinesalite_server.js"
NODE_MODULES = TESTS_DIR / "node_modules"

# Credentials for talking to the fake; it does not check them.
_FAKE_AWS: dict[str, str] = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of 127.0.0.1 free right now (each held bound until all are
    chosen, so the OS cannot hand out one of them twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in socks]


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections while the block runs: bound by this
    process without listening, so no other process (another test process's server) can
    start answering on it, as it could on a port found free and let go."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        yield port


# --- kinesalite ------------------------------------------------------------------------------


class KinesaliteServer(ServerProcess):
    name = "kinesalite"
    _client: Any = None

    def client(self) -> Any:
        """A (cached) synchronous boto3 Kinesis client for this server."""
        if self._client is None:
            config = Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2})
            self._client = boto3.client(
                "kinesis", endpoint_url=self.url, config=config, **_FAKE_AWS
            )
        return self._client

    def stream_names(self) -> list[str]:
        names: list[str] = self.client().list_streams(Limit=10000)["StreamNames"]
        return names

    def reset(self, timeout: float = 10.0) -> None:
        """Delete every stream and wait until none is listed (DELETING ones are listed)."""
        client = self.client()
        errors = client.exceptions
        not_deletable = (errors.ResourceInUseException, errors.ResourceNotFoundException)

        def all_gone() -> bool:
            names = self.stream_names()
            for name in names:
                # A stream still CREATING/UPDATING is retried next round; one DELETING is fine.
                with contextlib.suppress(*not_deletable):
                    client.delete_stream(StreamName=name, EnforceConsumerDeletion=True)
            return not names

        if not wait_until(all_gone, timeout=timeout):
            left = self.stream_names()
            raise ServerError(f"kinesalite still has streams after {timeout}s: {left}")

    def stop(self, timeout: float = 10.0) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        super().stop(timeout)


def start_kinesalite(
    *,
    create_stream_ms: int = 0,
    delete_stream_ms: int = 0,
    update_stream_ms: int = 0,
    shard_limit: int = 50,
    timeout: float = 30.0,
) -> KinesaliteServer:
    """Start an in-memory kinesalite on a free port of 127.0.0.1 (the OS picks the port).

    Needs ``node`` and ``npm ci --prefix tests`` (kinesalite in tests/node_modules).
    """
    node = shutil.which("node")
    if node is None:
        raise ServerError("node not found on PATH")
    if not (NODE_MODULES / "kinesalite").is_dir():
        raise ServerError(f"kinesalite is not installed; run: npm ci --prefix {TESTS_DIR}")
    argv = [
        node,
        str(KINESALITE_SCRIPT),
        f"--createStreamMs={create_stream_ms}",
        f"--deleteStreamMs={delete_stream_ms}",
        f"--updateStreamMs={update_stream_ms}",
        f"--shardLimit={shard_limit}",
    ]
    # kinesalite puts AWS_REGION / AWS_ACCOUNT_ID into ARNs; keep them fixed.
    env = {**os.environ, "AWS_REGION": "us-east-1", "AWS_ACCOUNT_ID": "000000000000"}
    server = KinesaliteServer(argv, env=env, stdin_pipe=True)

    def port_printed() -> bool:
        # The script prints the port on one line once it is listening.
        text = server.stdout_path.read_text()
        if "\n" not in text:
            return False
        server.port = int(text.split("\n", 1)[0])
        return True

    server.wait_ready(port_printed, timeout=timeout)
    server.wait_ready(lambda: http_answers(server.url), timeout=timeout)
    return server
