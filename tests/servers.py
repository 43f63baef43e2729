"""Start, reset and stop real servers for tests: redis-server, moto_server and kinesalite.

Plain helpers without pytest, so they can also be used from scripts::

    server = start_redis()
    try:
        ...  # use server.url
        server.flush()
    finally:
        server.stop()

Every server listens on 127.0.0.1 only, on a free port, and keeps its state in memory
(or in a temporary directory that ``stop()`` removes).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import boto3
import redis
from botocore.config import Config

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
TESTS_DIR = Path(__file__).resolve().parent
KINESALITE_SCRIPT = TESTS_DIR / "kinesalite_server.js"
NODE_MODULES = TESTS_DIR / "node_modules"

# Credentials for talking to the fakes; neither server checks them.
_FAKE_AWS: dict[str, str] = {
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
    "region_name": "us-east-1",
}


S = TypeVar("S", bound="ServerProcess")


class ServerError(RuntimeError):
    """A test server failed to start or to become ready."""


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies, even if killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _passes(check: Callable[[], bool]) -> bool:
    """``check()``, with any exception counting as "not yet"."""
    try:
        return check()
    except Exception:
        return False


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> bool:
    """Call ``check`` until it returns True or ``timeout`` seconds pass; return the outcome.

    Exceptions raised by ``check`` count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while not _passes(check):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def _http_answers(url: str) -> bool:
    """True if anything answers HTTP at ``url`` (any status code counts)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True


class ServerProcess:
    """A server running as a child process, with its stdout/stderr in a temporary directory."""

    name = "server"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        stdin_pipe: bool = False,
    ) -> None:
        self.port: int = port or 0
        self.workdir = Path(tempfile.mkdtemp(prefix=f"test-{self.name}-"))
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                # A pipe we close on stop() lets a child that watches stdin exit with us.
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def output(self) -> str:
        """The server's stdout and stderr so far, for error messages."""
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = path.read_text(errors="replace").strip() if path.exists() else ""
            parts.append(f"--- {label} ---\n{text or '(empty)'}")
        return "\n".join(parts)

    def wait_ready(self, check: Callable[[], bool], *, timeout: float) -> None:
        """Poll ``check`` until it passes; if the server exits or ``timeout`` s pass first,
        stop it and raise ServerError with its output."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            if _passes(check):
                return
            time.sleep(0.05)
        code = self.process.poll()
        status = f"exited with code {code}" if code is not None else f"not ready in {timeout}s"
        message = f"{self.name} on port {self.port} {status}\n{self.output()}"
        self.stop()
        raise ServerError(message)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (kill it if it does not exit in ``timeout`` s) and clean up."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _start_on_free_port(start: Callable[[int], S], attempts: int = 3) -> S:
    """Call ``start(port)`` with fresh free ports, retrying if another process grabbed one."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except ServerError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


# --- redis -----------------------------------------------------------------------------------


class RedisServer(ServerProcess):
    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def ping(self) -> bool:
        """True if the server answers PING (raw socket: redis-py would retry with backoff)."""
        with socket.create_connection((HOST, self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def flush(self) -> None:
        """Delete every key in every database (FLUSHALL)."""
        with redis.Redis(host=HOST, port=self.port, socket_timeout=5) as client:
            client.flushall()


def start_redis(timeout: float = 15.0, port: int | None = None) -> RedisServer:
    """Start an in-memory redis-server (no RDB/AOF) on a free port of 127.0.0.1 (or ``port``)."""
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary is None:
        raise ServerError("redis-server not found on PATH (apt-get install redis-server)")

    def start(port: int) -> RedisServer:
        argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--daemonize", "no", "--loglevel", "warning"]
        server = RedisServer(argv, port=port)
        server.wait_ready(server.ping, timeout=timeout)
        return server

    return start(port) if port is not None else _start_on_free_port(start)


# --- moto_server -----------------------------------------------------------------------------


class MotoServer(ServerProcess):
    name = "moto_server"

    def reset(self) -> None:
        """Drop all state of all mocked services (POST /moto-api/reset)."""
        request = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise ServerError(f"moto reset answered HTTP {response.status}")


def start_moto(timeout: float = 60.0) -> MotoServer:
    """Start ``moto_server`` (from this interpreter's environment) on a free port."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise ServerError(f"{binary} not found (pip install 'moto[server]')")

    def start(port: int) -> MotoServer:
        server = MotoServer([str(binary), "-H", HOST, "-p", str(port)], port=port)
        server.wait_ready(lambda: _http_answers(f"{server.url}/moto-api/"), timeout=timeout)
        return server

    return _start_on_free_port(start)


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
    server.wait_ready(lambda: _http_answers(server.url), timeout=timeout)
    return server
